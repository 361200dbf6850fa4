r"""Training step time and peak memory of full fine-tuning against PEFT configs, side by side in one process.

    python tools/benchmark_train.py                                     # micro model, CPU, default methods
    python tools/benchmark_train.py --methods all --rounds 5
    python tools/benchmark_train.py --device cuda --size 512 --batch 2 --peft-dir configs/coco/peft \
        --base configs/coco/instance-segmentation/swin/maskformer2_swin_base_IN21k_384_bs16_50ep.yaml  # Swin-B

Every config is built once on the same base and fed the same batch; the configs are timed in interleaved
rounds (the median over rounds is reported), so machine noise hits them alike. Memory:
- cuda: torch.cuda.max_memory_allocated over a training step;
- cpu: the same quantity accounted by hand, since CPU has no allocator statistics: parameters + gradients +
  optimizer state + the activations autograd saves for backward (counted through saved-tensor hooks,
  each storage once, parameters excluded).
Ratios are against full fine-tuning (goal from the issue: PEFT memory <= 60%, step time <= 80%).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

DEFAULT = ["baseline_heads_only", "baseline_whole_head", "lora_backbone", "lora_msdeformattn", "adapters_1",
           "adapters_2", "adapters_3", "lora_adapters"]


def chosen(methods: list, known: list) -> list:
    """--methods as a list of config names: 'all' is every config of --peft-dir (`known`), the defaults first."""
    if methods != ["all"]:
        return methods
    return [m for m in DEFAULT if m in known] + [m for m in known if m not in DEFAULT]


def config_names(peft_dir: str) -> list:
    """The PEFT configs of `peft_dir` that --methods can name: its yaml files but the shared Base-*.yaml and
    full_finetune.yaml (the reference that is always measured)."""
    if not os.path.isdir(peft_dir):
        return []
    return sorted(f[: -len(".yaml")] for f in os.listdir(peft_dir)
                  if f.endswith(".yaml") and not f.startswith("Base-") and f != "full_finetune.yaml")


def load(config, base, device):
    """The config `base` with the meta-architecture and MODEL.PEFT node of the PEFT file `config` (None: full
    fine-tuning of the base)."""
    from peft_d2.config import get_cfg, merge_config

    cfg = merge_config(get_cfg(), base)
    if config is not None:
        peft = merge_config(get_cfg(), config)
        cfg.MODEL.META_ARCHITECTURE = peft.MODEL.META_ARCHITECTURE
        cfg.MODEL.PEFT = peft.MODEL.PEFT
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = device, ""
    return cfg


def build(cfg):
    from detectron2.modeling import build_model

    from peft_d2.build import build_base_model
    from peft_d2.config import peft_config_from_cfg
    from peft_d2.inject import inject
    from peft_d2.tuners import sfa

    torch.manual_seed(0)
    if cfg.MODEL.META_ARCHITECTURE == "PEFT" and "sfa" in cfg.MODEL.PEFT.METHODS:  # a selection of budgeted size
        model = build_base_model(cfg)
        pc = peft_config_from_cfg(cfg)
        inject(model, pc, sfa_selection=sfa.random_selection(model, pc.sfa))
    else:
        model = build_model(cfg)
    return model.train()


def make_batch(n, size, num_classes, device):
    from detectron2.structures import BitMasks, Instances

    g = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(n):
        inst = Instances((size, size))
        masks = torch.zeros(3, size, size, dtype=torch.bool)
        for k in range(3):
            y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
            masks[k, y : y + size // 3, x : x + size // 3] = True
        inst.gt_classes = torch.randint(0, num_classes, (3,), generator=g)
        inst.gt_masks = BitMasks(masks).tensor
        batch.append({"image": torch.randint(0, 256, (3, size, size), generator=g).float().to(device),
                      "height": size, "width": size, "instances": inst.to(device)})
    return batch


def saved_activation_bytes(model, batch):
    """Bytes of the tensors autograd saves for backward during one forward (each storage once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    from detectron2.utils.events import EventStorage

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), EventStorage(0):
        loss = sum(model(batch).values())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=os.path.join(ROOT, "configs/synthetic/maskformer2_swin_micro_bs4_B.yaml"))
    parser.add_argument("--peft-dir", default=os.path.join(ROOT, "configs/synthetic/peft"))
    parser.add_argument("--methods", nargs="+", default=DEFAULT,
                        help="names of configs in --peft-dir, or 'all': every one there, the defaults first")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per config and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="mixed precision as detectron2's AMPTrainer: float16 "
                        "autocast and a GradScaler on CUDA (bfloat16 autocast on CPU)")
    args = parser.parse_args(argv)
    known = config_names(args.peft_dir)
    methods = chosen(args.methods, known)
    unknown = [m for m in methods if m not in known]
    if unknown:  # a usage error before anything is imported or built
        parser.error(f"argument --methods: no config {unknown[0]}.yaml in {args.peft_dir}; valid names: "
                     f"{', '.join(known) or '(none)'} (or 'all')")

    from detectron2.utils.events import EventStorage
    from tabulate import tabulate
    from train_net import build_optimizer_from_trainable

    import peft_d2.build  # noqa: F401
    import peft_d2.modeling  # noqa: F401
    from peft_d2.config import PeftConfigError

    cuda = args.device.startswith("cuda")

    full = load(None, args.base, args.device)
    runs, skipped = {"full_finetune": (full, build(full))}, []
    for m in methods:
        cfg = load(os.path.join(args.peft_dir, f"{m}.yaml"), args.base, args.device)
        try:
            runs[m] = cfg, build(cfg)
        except PeftConfigError as e:  # 'all' may hold configs for other bases (lora_resnet); a named one must apply
            if args.methods != ["all"]:
                raise
            skipped.append(f"{m} (not applicable to this base: {e})")
    num_classes = runs["full_finetune"][0].MODEL.SEM_SEG_HEAD.NUM_CLASSES
    batch = make_batch(args.batch, args.size, num_classes, args.device)
    optims = {m: build_optimizer_from_trainable(cfg, model) for m, (cfg, model) in runs.items()}
    device_type = torch.device(args.device).type
    amp_dtype = torch.float16 if cuda else torch.bfloat16
    scalers = {m: torch.amp.GradScaler(device_type, enabled=args.amp and cuda) for m in runs}

    def step(m):
        model, opt, scaler = runs[m][1], optims[m], scalers[m]
        with EventStorage(0), torch.autocast(device_type, dtype=amp_dtype, enabled=args.amp):
            loss = sum(model(batch).values())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    memory = {}
    for m in runs:  # one warm-up step each (allocates optimizer state), then memory
        step(m)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step(m)
            torch.cuda.synchronize()
            memory[m] = torch.cuda.max_memory_allocated()
        else:
            model, opt = runs[m][1], optims[m]
            trainable = [p for p in model.parameters() if p.requires_grad]
            state = [t for s in opt.state.values() for t in s.values()]
            memory[m] = (tensor_bytes(model.parameters()) + tensor_bytes(trainable) + tensor_bytes(state)
                         + saved_activation_bytes(model, batch))
    times = {m: [] for m in runs}
    for _ in range(args.rounds):
        for m in runs:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(m)
            if cuda:
                torch.cuda.synchronize()
            times[m].append((time.perf_counter() - t0) / args.steps)

    full_t, full_m = statistics.median(times["full_finetune"]), memory["full_finetune"]
    rows = []
    for m, (_, model) in runs.items():
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        t = statistics.median(times[m])
        rows.append([m, f"{trainable:,}", f"{100 * trainable / total:.2f}", f"{1000 * t:.1f}", f"{t / full_t:.2f}",
                     f"{memory[m] / 2**20:.1f}", f"{memory[m] / full_m:.2f}"])
    kind = "peak allocated (cuda)" if cuda else "params+grads+optimizer+saved activations (cpu)"
    amp = f"; AMP ({str(amp_dtype).split('.')[-1]})" if args.amp else ""
    print(f"base: {os.path.relpath(args.base, ROOT)}; batch {args.batch} x {args.size}px; device {args.device}{amp}; "
          f"median of {args.rounds} rounds x {args.steps} steps; memory = {kind}")
    print(tabulate(rows, headers=["config", "trainable", "%", "step ms", "step / full", "memory MiB",
                                  "memory / full"]))
    for line in skipped:
        print(f"skipped {line}")


if __name__ == "__main__":
    main()
