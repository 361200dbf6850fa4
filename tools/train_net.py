#!/usr/bin/env python3
r"""Train or evaluate a Mask2Former-compatible model with detectron2's standard command line.

    python tools/train_net.py --config-file configs/synthetic/maskformer2_swin_micro_bs4_A.yaml \
        --num-gpus 0 OUTPUT_DIR output/synthetic_A
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/synthetic_A/model_final.pth
    python tools/train_net.py --config-file ... --resume            # continue from OUTPUT_DIR/last_checkpoint
    python tools/train_net.py --config-file ... --eval-only --adapter cells=cells.safetensors \
        --adapter roads=roads.safetensors MODEL.WEIGHTS base.pth DATASETS.TEST '("cells_val", "roads_val")'
        # several adapter files on one base in one process: adapter i on test dataset i (or all on one)
    python tools/train_net.py --config-file ... --dataset cells_train=data/cells/train.json:data/cells/images \
        DATASETS.TRAIN '("cells_train",)'    # a COCO-format dataset of one's own (repeatable; classes from the file)

The training mapper comes from INPUT.DATASET_MAPPER_NAME (peft_d2.data.MAPPERS), the evaluators from the test
dataset's metadata `evaluator_type`. The optimizer is built here (`build_optimizer_from_trainable`): AdamW or SGD
over the parameters that require grad only (so frozen PEFT bases cost nothing), backbone learning rate scaled by
SOLVER.BACKBONE_MULTIPLIER, no weight decay on norms and embeddings, optional whole-model gradient clipping.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from tabulate import tabulate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from peft_d2.quiet import quiet_third_party_notices  # noqa: E402

quiet_third_party_notices()  # before detectron2's imports, which raise most of them

import detectron2.utils.comm as comm  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import MetadataCatalog, build_detection_train_loader  # noqa: E402
from detectron2.data.catalog import Metadata  # noqa: E402
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, hooks, launch  # noqa: E402
from detectron2.evaluation import (  # noqa: E402
    COCOEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
    inference_on_dataset,
    print_csv_format,
    verify_results,
)
from detectron2.modeling import build_model  # noqa: E402
from detectron2.projects.deeplab import build_lr_scheduler  # noqa: E402
from detectron2.utils.events import CommonMetricPrinter, EventStorage, TensorboardXWriter  # noqa: E402
from detectron2.utils.file_io import PathManager  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

import peft_d2.modeling  # noqa: E402,F401  (registers MaskFormer, D2SwinTransformer, heads)
from peft_d2.build import build_base_model  # noqa: E402  (and registers the PEFT meta-architecture, backbone)
from peft_d2.checkpoint import inject_from_checkpoint, read_adapter  # noqa: E402
from peft_d2.config import config_functions, merge_config, parse_command_line, peft_config_from_cfg  # noqa: E402
from peft_d2.data import build_train_mapper, register_all_datasets  # noqa: E402
from peft_d2.data.datasets import coco_instances  # noqa: E402  (--dataset NAME=ANNOTATIONS.json:IMAGE_ROOT)
from peft_d2.engine import (  # noqa: E402
    NORM_TYPES,
    AdapterExportHook,
    JSONWriter,
    ParameterReportHook,
    PeftCheckpointer,
    build_optimizer,
    peft_param_groups,
)
from peft_d2.errors import PeftConfigError  # noqa: E402
from peft_d2.evaluation import LVISEvaluator, PanopticEvaluator  # noqa: E402
from peft_d2.inject import inject, keep_report  # noqa: E402
from peft_d2.multi import load_adapters, set_adapter  # noqa: E402
from peft_d2.tuners import sfa  # noqa: E402

# Functions that add config keys to detectron2's defaults, applied in order by `setup`: DeepLab's (the
# "WarmupPolyLR" schedule), Mask2Former's, ViT's, SAM's and MODEL.PEFT; append your project's own.
CONFIG_FUNCTIONS = config_functions()

# parameters that are embeddings in all but type (Swin's relative position table, absolute position embedding)
_EMBEDDING_NAMES = ("relative_position_bias_table", "absolute_pos_embed")


def _require(module: str, what: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise RuntimeError(f"{what} needs the '{module}' package, which is not installed: {install}")


# --------------------------------------------------------------------------------------------- optimizer


def optimizer_param_groups(cfg, model: torch.nn.Module) -> list[dict[str, Any]]:
    """One group per trainable parameter with its lr and weight decay (shared parameters counted once).

    Only parameters with requires_grad enter the optimizer, so a PEFT model (frozen base) gets an optimizer over
    its added modules alone.
    """
    base_lr, wd = cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY
    seen: set[int] = set()
    groups = []
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            lr, decay = base_lr, wd
            if "backbone" in module_name:
                lr = lr * cfg.SOLVER.BACKBONE_MULTIPLIER
            if any(k in name for k in _EMBEDDING_NAMES):
                decay = 0.0
            if isinstance(module, NORM_TYPES):
                decay = cfg.SOLVER.WEIGHT_DECAY_NORM
            if isinstance(module, torch.nn.Embedding):
                decay = cfg.SOLVER.WEIGHT_DECAY_EMBED
            groups.append({"params": [p], "lr": lr, "weight_decay": decay, "name": f"{module_name}.{name}"})
    return groups


def build_optimizer_from_trainable(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Mask2Former's optimizer over the trainable parameters (peft_d2.engine.build_optimizer: SOLVER.OPTIMIZER
    ADAMW or SGD, SOLVER.CLIP_GRADIENTS with "full_model" clipping as in the official recipe). A PEFT model
    gets peft_d2's groups instead (lora, adapter, head, norm with MODEL.PEFT.OPTIM learning rates)."""
    if getattr(model, "peft_config", None) is not None:
        groups = peft_param_groups(cfg, model)
    else:
        groups = optimizer_param_groups(cfg, model)
        for g in groups:
            g.pop("name")
    if not groups:
        raise ValueError("No trainable parameters: every parameter of the model has requires_grad=False.")
    return build_optimizer(cfg, groups)


# --------------------------------------------------------------------------------------------- evaluators


class ThingSubsetCOCOEvaluator(COCOEvaluator):
    """COCO instance evaluation of a panoptic model whose class ids index all categories (things and stuff).

    ADE20K panoptic maps each thing's dataset id to its index among all 150 classes, which COCOEvaluator rejects
    (it wants contiguous thing ids 0..T-1). Predictions are renumbered to thing rank; stuff predictions dropped.
    """

    def __init__(self, dataset_name: str, *args, **kwargs):
        super().__init__(dataset_name, *args, **kwargs)
        meta = self._metadata
        ordered = sorted(meta.thing_dataset_id_to_contiguous_id.items(), key=lambda kv: kv[1])
        self._rank_of = {contiguous: rank for rank, (_, contiguous) in enumerate(ordered)}
        fields = dict(meta.as_dict())
        fields["thing_dataset_id_to_contiguous_id"] = {d: r for r, (d, _) in enumerate(ordered)}
        self._metadata = Metadata(**fields)  # a detached copy: the catalog entry keeps its own mapping

    def process(self, inputs, outputs):
        renumbered = []
        for out in outputs:
            out = dict(out)
            if "instances" in out:
                inst = out["instances"]
                classes = inst.pred_classes.tolist()
                keep = torch.tensor([c in self._rank_of for c in classes], dtype=torch.bool)
                inst = inst[keep]
                inst.pred_classes = torch.tensor(
                    [self._rank_of[c] for c in inst.pred_classes.tolist()], dtype=torch.int64
                )
                out["instances"] = inst
            renumbered.append(out)
        super().process(inputs, renumbered)


def load_label_image(filename: str, dtype=int):
    """Ground-truth label PNG as an array. detectron2's default loader calls np.array(..., copy=False), which
    NumPy 2 rejects for PIL images; np.asarray copies only when it must."""
    with PathManager.open(filename, "rb") as f:
        return np.asarray(Image.open(f), dtype=dtype)


def _coco_kwargs(cfg) -> dict:
    # Without detectron2._C, COCOEvaluator falls back to pycocotools by itself; say so up front (no warning).
    # COCO's AP counts the first maxDets detections of an image: TEST.DETECTIONS_PER_IMAGE (COCO's own is 100).
    has_c = importlib.util.find_spec("detectron2._C") is not None
    return dict({} if has_c else {"use_fast_impl": False}, max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)


def build_evaluators(cfg, dataset_name: str, output_folder: str | None = None) -> DatasetEvaluators:
    """The evaluators for `dataset_name`, chosen by its metadata evaluator_type and MODEL.MASK_FORMER.TEST.*."""
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
    os.makedirs(output_folder, exist_ok=True)
    meta = MetadataCatalog.get(dataset_name)
    etype = getattr(meta, "evaluator_type", None)
    test = cfg.MODEL.MASK_FORMER.TEST
    coco_kwargs = _coco_kwargs(cfg)
    evaluators = []
    panoptic_types = ("coco_panoptic_seg", "ade20k_panoptic_seg", "cityscapes_panoptic_seg")
    if etype == "sem_seg" or (etype in ("coco_panoptic_seg", "ade20k_panoptic_seg") and test.SEMANTIC_ON):
        evaluators.append(
            SemSegEvaluator(
                dataset_name, distributed=True, output_dir=output_folder, sem_seg_loading_fn=load_label_image
            )
        )
    if etype in panoptic_types and test.PANOPTIC_ON:
        # PQ through torchmetrics instead of detectron2's COCOPanopticEvaluator (panopticapi is not on the registry)
        _require("torchmetrics", "Panoptic evaluation (PanopticEvaluator)", "pip install torchmetrics")
        evaluators.append(PanopticEvaluator(dataset_name, output_folder))
    if etype == "coco":
        evaluators.append(COCOEvaluator(dataset_name, output_dir=output_folder, **coco_kwargs))
    if etype == "coco_panoptic_seg" and test.INSTANCE_ON:
        evaluators.append(COCOEvaluator(dataset_name, tasks=("segm",), output_dir=output_folder, **coco_kwargs))
    if etype == "ade20k_panoptic_seg" and test.INSTANCE_ON:
        evaluators.append(
            ThingSubsetCOCOEvaluator(dataset_name, tasks=("segm",), output_dir=output_folder, **coco_kwargs)
        )
    if etype == "lvis":
        _require("lvis", "LVIS evaluation (LVISEvaluator)", "pip install lvis")
        evaluators.append(LVISEvaluator(dataset_name, output_dir=output_folder))
    city_inst = etype == "cityscapes_instance" or (etype == "cityscapes_panoptic_seg" and test.INSTANCE_ON)
    city_sem = etype == "cityscapes_sem_seg" or (etype == "cityscapes_panoptic_seg" and test.SEMANTIC_ON)
    if city_inst or city_sem:
        _require("cityscapesscripts", "Cityscapes evaluation", "pip install cityscapesscripts")
        if comm.get_rank() == 0 and torch.cuda.device_count() > comm.get_world_size():
            raise RuntimeError("Cityscapes evaluators need all visible GPUs in use (--num-gpus).")
        from detectron2.evaluation import CityscapesInstanceEvaluator, CityscapesSemSegEvaluator

        if city_inst:
            evaluators.append(CityscapesInstanceEvaluator(dataset_name))
        if city_sem:
            evaluators.append(CityscapesSemSegEvaluator(dataset_name))
    if not evaluators:
        raise NotImplementedError(
            f"No evaluator for dataset '{dataset_name}' with evaluator_type={etype!r} "
            f"(MODEL.MASK_FORMER.TEST: SEMANTIC_ON={test.SEMANTIC_ON}, INSTANCE_ON={test.INSTANCE_ON}, "
            f"PANOPTIC_ON={test.PANOPTIC_ON})."
        )
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)


# --------------------------------------------------------------------------------------------- trainer


def is_peft(cfg) -> bool:
    return cfg.MODEL.META_ARCHITECTURE == "PEFT" or cfg.MODEL.BACKBONE.NAME == "PEFTBackbone"


def _unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class Trainer(DefaultTrainer):
    """DefaultTrainer with Mask2Former's data, evaluation, optimizer and schedule, and PEFT.

    With a PEFT config (MODEL.META_ARCHITECTURE "PEFT"): the optimizer holds only trainable tensors in
    peft_d2's groups; training checkpoints hold only trainable tensors (PeftCheckpointer; MODEL.PEFT.
    FULL_CHECKPOINTS for whole ones); the base comes from MODEL.WEIGHTS and then the adapter from
    MODEL.PEFT.WEIGHTS; adapter_<iter>.safetensors / adapter_final.safetensors are exported; the parameter
    report goes to metrics.json and TensorBoard.

    `log_period`: iterations between metric writes, also the smoothing window of metrics.json (detectron2's
    default 20; tests set 1 to read every iteration's raw losses).
    """

    log_period = 20

    def build_hooks(self):
        if is_peft(self.cfg):  # before super().build_hooks(), whose PeriodicCheckpointer takes self.checkpointer
            self.checkpointer = PeftCheckpointer(
                self.model, self.cfg.OUTPUT_DIR, full=self.cfg.MODEL.PEFT.FULL_CHECKPOINTS,
                trainer=weakref.proxy(self),
            )
        ret = super().build_hooks()
        for h in ret:
            if isinstance(h, hooks.PeriodicWriter):
                h._period = self.log_period
        if is_peft(self.cfg):
            model = _unwrap(self.model)
            ret.insert(0, ParameterReportHook(model))
            ret.insert(-1, AdapterExportHook(model, self.cfg.OUTPUT_DIR, self.cfg.SOLVER.CHECKPOINT_PERIOD))
        return ret

    def build_writers(self):
        out = self.cfg.OUTPUT_DIR
        return [
            CommonMetricPrinter(self.max_iter, window_size=self.log_period),
            JSONWriter(os.path.join(out, "metrics.json"), window_size=self.log_period),
            TensorboardXWriter(out, window_size=self.log_period),
        ]

    def resume_or_load(self, resume=True):
        """PEFT: base weights (MODEL.WEIGHTS), then the last training checkpoint (--resume) or the adapter
        (MODEL.PEFT.WEIGHTS). Otherwise detectron2's behaviour."""
        if not is_peft(self.cfg):
            return super().resume_or_load(resume=resume)
        load_peft_weights(self.cfg, self.checkpointer, resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            self.start_iter = self.iter + 1  # the trainer state (iteration, optimizer, scheduler) came back

    @classmethod
    def build_model(cls, cfg):
        if is_peft(cfg) and "sfa" in cfg.MODEL.PEFT.METHODS:
            model = build_sfa_model(cfg, cls.build_train_loader)
        else:
            model = build_model(cfg)
        logging.getLogger("peft_d2").info(f"Model:\n{model}")
        return model

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluators(cfg, dataset_name, output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=build_train_mapper(cfg))

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        # detectron2's schedules plus DeepLab's "WarmupPolyLR" (Cityscapes / ADE20K configs)
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer_from_trainable(cfg, model)


def load_peft_weights(cfg, checkpointer: PeftCheckpointer, resume: bool, eval_only: bool = False):
    """MODEL.WEIGHTS into the (injected) model, then MODEL.PEFT.WEIGHTS, or with `resume` the last checkpoint; logs
    what was loaded, and warns about a random base or, with `eval_only`, untrained PEFT tensors."""
    checkpointer.load_weights(cfg.MODEL.WEIGHTS, cfg.MODEL.PEFT.WEIGHTS, resume=resume,
                              check_base=cfg.MODEL.PEFT.CHECK_BASE, eval_only=eval_only)


def build_sfa_model(cfg, build_train_loader):
    """SFA needs its selection before injection: from MODEL.PEFT.WEIGHTS when given, otherwise by the
    lottery-ticket warm-up on the pretrained base (MODEL.WEIGHTS) with batches of the training loader."""
    model = build_base_model(cfg)
    if cfg.MODEL.WEIGHTS:  # before the adapter file, whose base check reads the base's values; load_peft_weights
        # loads it again, with its report of mismatching keys, once the model is injected
        PeftCheckpointer(model, report_keys=False).load(cfg.MODEL.WEIGHTS, checkpointables=[])
    if cfg.MODEL.PEFT.WEIGHTS:
        keep_report(model, inject_from_checkpoint(model, cfg.MODEL.PEFT.WEIGHTS, check_base=cfg.MODEL.PEFT.CHECK_BASE))
    else:
        config = peft_config_from_cfg(cfg)
        batches = iter(build_train_loader(cfg))

        def loss_fn(m):
            with EventStorage(0):
                return sum(m(next(batches)).values())

        selection = sfa.select(model, config.sfa, loss_fn)
        keep_report(model, inject(model, config, sfa_selection=selection))
    return model


def patch_cpu_ddp():
    """detectron2 wraps models in DDP with device_ids=[local rank], which DDP refuses for CPU modules; on CPU
    (gloo) the wrapper must get device_ids=None."""
    import detectron2.engine.defaults as defaults
    from detectron2.engine import create_ddp_model

    if not getattr(defaults.create_ddp_model, "peft_d2_cpu", False):
        def create_cpu_ddp_model(model, **kwargs):
            return create_ddp_model(model, device_ids=None, **kwargs)

        create_cpu_ddp_model.peft_d2_cpu = True
        defaults.create_ddp_model = create_cpu_ddp_model


# --------------------------------------------------------------------------------------------- entry points


def setup(args):
    """Config from --config-file and opts; (re-)registers peft_d2's datasets under $DETECTRON2_DATASETS and the
    COCO-format datasets of --dataset / DATASETS.COCO_INSTANCES, whose class count becomes the model's."""
    cfg = get_cfg()
    for fn in CONFIG_FUNCTIONS:
        fn(cfg)
    merge_config(cfg, args.config_file, args.opts)
    no_cuda = not torch.cuda.is_available() and cfg.MODEL.DEVICE.startswith("cuda")
    if no_cuda:
        cfg.MODEL.DEVICE = "cpu"
    if cfg.MODEL.DEVICE == "cpu" and cfg.SOLVER.AMP.ENABLED:
        cfg.SOLVER.AMP.ENABLED = False  # detectron2's AMPTrainer needs CUDA
    # registered here, in the launched function: every DDP worker registers them too
    register_all_datasets()
    own = [*cfg.DATASETS.COCO_INSTANCES, *(getattr(args, "datasets", None) or [])]
    cfg.DATASETS.COCO_INSTANCES = list(dict.fromkeys(own))
    classes = coco_instances.register_coco_instances(cfg.DATASETS.COCO_INSTANCES)
    num_classes = coco_instances.set_num_classes(cfg, classes, explicit=args.opts[0::2])
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="peft_d2")
    log = logging.getLogger("peft_d2")
    if no_cuda:
        log.info("CUDA is not available: running on the CPU (MODEL.DEVICE cpu)")
    for name, names in classes.items():
        meta = MetadataCatalog.get(name)
        log.info(f"Dataset '{name}': COCO instances of {meta.json_file}, images in {meta.image_root}, "
                 f"{len(names)} classes {names}")
    if num_classes is not None:
        keys = ", ".join(coco_instances.NUM_CLASSES_KEYS)
        log.info(f"{keys}: {num_classes}, the classes of the datasets of DATASETS.TRAIN and DATASETS.TEST")
    return cfg


def adapter_pairs(cfg, adapters: list[str]) -> list[tuple[str, str, str]]:
    """`--adapter NAME=FILE`, repeated, against DATASETS.TEST: (name, file, dataset) for adapter i on dataset i, or
    every adapter on the one dataset."""
    named = []
    for item in adapters:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise PeftConfigError(f"--adapter: expected NAME=FILE, got {item!r}")
        if not os.path.isfile(path):
            raise PeftConfigError(f"--adapter {item}: no such adapter file")
        named.append((name, path))
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise PeftConfigError(f"--adapter: repeated names in {names}")
    datasets = list(cfg.DATASETS.TEST)
    if len(datasets) == 1:
        datasets = datasets * len(named)
    if len(datasets) != len(named):
        raise PeftConfigError(f"--adapter: {len(named)} adapters but DATASETS.TEST has {len(cfg.DATASETS.TEST)} "
                              "datasets; give one dataset per adapter (adapter i on dataset i) or a single one")
    if cfg.MODEL.PEFT.WEIGHTS:
        raise PeftConfigError("--adapter serves adapter files on the plain base: leave MODEL.PEFT.WEIGHTS empty")
    if cfg.MODEL.BACKBONE.NAME == "PEFTBackbone":
        raise PeftConfigError("--adapter needs the base model: use a MODEL.META_ARCHITECTURE 'PEFT' config "
                              "(or the base's own config), not MODEL.BACKBONE.NAME 'PEFTBackbone'")
    return [(n, p, d) for (n, p), d in zip(named, datasets)]


def evaluate_adapters(cfg, adapters: list[str]) -> dict:
    """Evaluate several adapter files of one base in one process: the base (MODEL.WEIGHTS) is built and loaded
    once, the files are served from it (peft_d2.load_adapters) and each is evaluated on its dataset. Each result
    block names its adapter, and one table of them all ends the log (`adapter_summary`).
    Returns {adapter name: {dataset: results}}; the evaluators write under OUTPUT_DIR/<adapter name>/inference."""
    pairs = adapter_pairs(cfg, adapters)
    model = build_base_model(cfg) if cfg.MODEL.META_ARCHITECTURE == "PEFT" else build_model(cfg)
    # the base tensors that the files hold (a class head for another class count) may differ in shape in the
    # base checkpoint: the files fill them, so their mismatch is no warning
    supplied = {name for _, path, _ in pairs for name in read_adapter(path)[0]}
    PeftCheckpointer(model, save_dir=cfg.OUTPUT_DIR, supplied=supplied).load(cfg.MODEL.WEIGHTS, checkpointables=[])
    load_adapters(model, {n: p for n, p, _ in pairs}, check_base=cfg.MODEL.PEFT.CHECK_BASE)
    model.eval()
    logger = logging.getLogger("peft_d2")
    results = {}
    for name, path, dataset in pairs:
        logger.info(f"Evaluating adapter {name!r} ({path}) on {dataset}")
        evaluator = Trainer.build_evaluator(cfg, dataset, os.path.join(cfg.OUTPUT_DIR, name, "inference"))
        set_adapter(model, name)
        try:
            res = inference_on_dataset(model, Trainer.build_test_loader(cfg, dataset), evaluator)
        finally:
            set_adapter(model, None)
        results.setdefault(name, {})[dataset] = res
        if comm.is_main_process():
            logger.info(f"Evaluation results of adapter {name!r} on {dataset} in csv format:")
            print_csv_format(res)
    if comm.is_main_process():
        logger.info(f"Evaluation results of {len(pairs)} adapters on one base:\n{adapter_summary(results)}")
    return results


def adapter_summary(results: dict) -> str:
    """`evaluate_adapters`' results as one table: a row per adapter, dataset and task with the task's main
    metrics, those that detectron2's print_csv_format copies (per-category ones, named 'AP-<class>', left out)."""
    rows, columns = [], []
    for name, by_dataset in results.items():
        for dataset, by_task in by_dataset.items():
            for task, metrics in by_task.items():
                metrics = metrics if isinstance(metrics, Mapping) else {task: metrics}
                main = {k: v for k, v in metrics.items() if "-" not in k}
                columns += [k for k in main if k not in columns]
                rows.append((name, dataset, task, main))
    if not rows:
        return "(the evaluators returned no results)"
    table = [[name, dataset, task, *(_cell(main.get(c)) for c in columns)] for name, dataset, task, main in rows]
    return tabulate(table, headers=["adapter", "dataset", "task", *columns], tablefmt="pipe", disable_numparse=True,
                    colalign=["left"] * 3 + ["right"] * len(columns))


def _cell(value) -> str:
    """A metric as detectron2's tables print it (3 decimals); blank where the task has no such metric."""
    return "" if value is None else f"{value:.3f}" if isinstance(value, (int, float)) else str(value)


def main(args):
    cfg = setup(args)
    if cfg.MODEL.DEVICE == "cpu" and comm.get_world_size() > 1:
        patch_cpu_ddp()
    if getattr(args, "adapters", None):
        if not args.eval_only:
            raise PeftConfigError("--adapter serves trained adapter files: it needs --eval-only")
        return evaluate_adapters(cfg, args.adapters)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        if is_peft(cfg):
            load_peft_weights(cfg, PeftCheckpointer(model, save_dir=cfg.OUTPUT_DIR), resume=args.resume,
                              eval_only=True)
        else:
            DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # DefaultTrainer.train() returns the final evaluation only when TEST.EXPECTED_RESULTS is set
    return getattr(trainer, "_last_eval_results", None)


def _dataset_spec(spec: str) -> str:
    try:
        coco_instances.parse_coco_spec(spec)
    except PeftConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec


def argument_parser():
    """detectron2's flags, plus --adapter (repeatable) for evaluating several adapter files on one base and
    --dataset (repeatable) for COCO-format datasets of one's own."""
    parser = default_argument_parser()
    parser.add_argument("--adapter", action="append", dest="adapters", metavar="NAME=FILE",
                        help="repeatable; with --eval-only: serve these adapter files from the base MODEL.WEIGHTS in "
                        "one process and evaluate the i-th on DATASETS.TEST[i] (or every one on the single dataset)")
    parser.add_argument("--dataset", action="append", dest="datasets", type=_dataset_spec,
                        metavar=coco_instances.SPEC,
                        help="repeatable: register a COCO-format instance dataset under NAME (appended to "
                        "DATASETS.COCO_INSTANCES) and name it in DATASETS.TRAIN / DATASETS.TEST; the model's "
                        "number of classes is taken from the annotation file's categories")
    return parser


def run(argv=None):
    args = parse_command_line(argument_parser(), argv)
    logging.getLogger("peft_d2").info(f"Command line arguments: {args}")
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


__all__ = [
    "CONFIG_FUNCTIONS",
    "Trainer",
    "argument_parser",
    "build_evaluators",
    "adapter_summary",
    "evaluate_adapters",
    "build_optimizer_from_trainable",
    "main",
    "optimizer_param_groups",
    "run",
    "setup",
]

if __name__ == "__main__":
    run()
