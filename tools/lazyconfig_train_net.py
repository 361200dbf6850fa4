#!/usr/bin/env python3
r"""Train or evaluate a detectron2 LazyConfig (``*.py``) model, with PEFT when the config wraps its model in
``peft_d2.lazy.peft_model``.

    python tools/lazyconfig_train_net.py --config-file configs/lazy/mask_rcnn_vitdet_b_lora.py \
        train.init_checkpoint=/path/to/model_final.pkl train.output_dir=output/vitdet_lora
    python tools/lazyconfig_train_net.py --config-file ... --eval-only train.peft_weights=.../adapter_final.safetensors
    python tools/lazyconfig_train_net.py --config-file ... --resume      # from train.output_dir/last_checkpoint

The command line is detectron2's (``--config-file``, ``--num-gpus``, ``--num-machines``, ``--machine-rank``,
``--dist-url``, ``--resume``, ``--eval-only`` and ``a.b=c`` overrides) and the config's layout that of
detectron2's model zoo LazyConfigs: ``model``, ``dataloader.{train,test,evaluator}``, ``optimizer`` (its
``params.model`` is set here), ``lr_multiplier`` and ``train``. peft_d2 adds, all optional:

- ``train.peft_weights``: an adapter file (safetensors) loaded after ``train.init_checkpoint``;
- ``train.peft_full_checkpoints``: training checkpoints hold whole models instead of the trainable tensors;
- ``train.peft_check_base``: False skips the checks that ``train.peft_weights`` fits the base (names, shapes and
  a digest of a few frozen tensors' values), for a base you know is the right one.

With a PEFT model, training checkpoints hold only the trainable tensors plus optimizer, scheduler and
iteration (`PeftCheckpointer`; ``--resume`` loads the base from ``train.init_checkpoint`` first), and
``adapter_<iter>.safetensors`` / ``adapter_final.safetensors`` are exported to ``train.output_dir``.
Without CUDA, ``train.device`` falls back to "cpu" and AMP is turned off.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from peft_d2.quiet import quiet_third_party_notices  # noqa: E402

quiet_third_party_notices()  # before detectron2's imports, which raise most of them

import detectron2.utils.comm as comm  # noqa: E402
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.engine import (  # noqa: E402
    AMPTrainer,
    SimpleTrainer,
    create_ddp_model,
    default_argument_parser,
    default_setup,
    hooks,
    launch,
)
from detectron2.evaluation import inference_on_dataset, print_csv_format  # noqa: E402
from detectron2.utils.events import CommonMetricPrinter, TensorboardXWriter  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from peft_d2.data import register_all_datasets  # noqa: E402
from peft_d2.engine import AdapterExportHook, JSONWriter, ParameterReportHook, PeftCheckpointer  # noqa: E402

logger = logging.getLogger("peft_d2")


def is_peft(model) -> bool:
    return getattr(model, "peft_config", None) is not None


def _unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def setup(args):
    """The LazyConfig of --config-file with the overrides applied; device and AMP adjusted to the machine."""
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    no_cuda = str(cfg.train.get("device", "cuda")).startswith("cuda") and not torch.cuda.is_available()
    if no_cuda:
        cfg.train.device = "cpu"
    if cfg.train.device == "cpu" and cfg.train.get("amp", {}).get("enabled", False):
        cfg.train.amp.enabled = False  # detectron2's AMPTrainer needs CUDA
    default_setup(cfg, args)
    # peft_d2's own records (the parameter report, what was loaded) to the console and train.output_dir/log.txt
    setup_logger(output=cfg.train.output_dir, distributed_rank=comm.get_rank(), name="peft_d2")
    if no_cuda:
        logger.info("CUDA is not available: running on the CPU (train.device cpu)")
    register_all_datasets()
    return cfg


def build_model(cfg):
    model = instantiate(cfg.model)
    logger.info(f"Model:\n{model}")
    return model.to(cfg.train.device)


def create_ddp(model, cfg):
    """detectron2's DDP wrapper; on CPU (gloo) without device_ids, which DDP refuses for CPU modules."""
    kwargs = dict(cfg.train.get("ddp", {}))
    if cfg.train.device == "cpu" and comm.get_world_size() > 1:
        kwargs["device_ids"] = None
    return create_ddp_model(model, **kwargs)


def load_weights(cfg, checkpointer: PeftCheckpointer, resume: bool, eval_only: bool = False) -> None:
    """``train.init_checkpoint`` (the base), then with `resume` the last checkpoint of ``train.output_dir``,
    otherwise ``train.peft_weights`` (an adapter file) when given; logs what was loaded (`PeftCheckpointer.
    load_weights`)."""
    peft_weights = cfg.train.get("peft_weights", "")
    if peft_weights and not is_peft(checkpointer.model):
        raise ValueError(
            f"train.peft_weights={peft_weights!r} is set, but the model has no PEFT modules: wrap cfg.model in "
            "peft_d2.lazy.peft_model (see configs/lazy/)"
        )
    checkpointer.load_weights(cfg.train.init_checkpoint, peft_weights, resume=resume, eval_only=eval_only,
                              check_base=bool(cfg.train.get("peft_check_base", True)),
                              keys=("train.init_checkpoint", "train.peft_weights"))


def make_checkpointer(cfg, model, **checkpointables) -> PeftCheckpointer:
    return PeftCheckpointer(
        model, cfg.train.output_dir, full=bool(cfg.train.get("peft_full_checkpoints", False)), **checkpointables
    )


def do_test(cfg, model):
    """Evaluate on ``dataloader.test`` with ``dataloader.evaluator`` (nothing when the config has none)."""
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    print_csv_format(results)
    return results


def writers(output_dir: str, max_iter: int) -> list:
    """detectron2's `default_writers`, with a metrics.json that is created at the first metrics written."""
    return [CommonMetricPrinter(max_iter), JSONWriter(os.path.join(output_dir, "metrics.json")),
            TensorboardXWriter(output_dir)]


def do_train(args, cfg):
    model = build_model(cfg)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    model = create_ddp(model, cfg)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optimizer)
    checkpointer = make_checkpointer(cfg, _unwrap(model), trainer=trainer)
    peft = is_peft(_unwrap(model))
    is_main = comm.is_main_process()
    trainer.register_hooks(
        [
            ParameterReportHook(_unwrap(model)) if peft else None,
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if is_main else None,
            AdapterExportHook(_unwrap(model), cfg.train.output_dir, cfg.train.checkpointer.period) if peft else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            hooks.PeriodicWriter(writers(cfg.train.output_dir, cfg.train.max_iter),
                                 period=cfg.train.log_period) if is_main else None,
        ]
    )
    load_weights(cfg, checkpointer, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return trainer


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = build_model(cfg)
        load_weights(cfg, make_checkpointer(cfg, model), resume=args.resume, eval_only=True)
        return do_test(cfg, create_ddp(model, cfg))
    do_train(args, cfg)
    return None


def run(argv=None):
    args = default_argument_parser().parse_args(argv)
    logger.info(f"Command line arguments: {args}")
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    run()
