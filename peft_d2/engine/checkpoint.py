"""`PeftCheckpointer`: detectron2's checkpointer, aware of PEFT.

- Loading a base checkpoint (MODEL.WEIGHTS) into an injected model: the PEFT tensors (and buffers, e.g. SFA's
  indices) it cannot contain are reported in one line instead of a warning per tensor; trainable tensors of
  another shape there (a class head for another class count) keep their initialisation without fvcore's warning
  per tensor, since training or an adapter file fills them, and buffers a module computes from the config
  (`config_buffers`, e.g. the criterion's class weights) follow the config. Any other mismatch still warns.
- `load_weights`: the base, then the last training checkpoint (resume) or the adapter file, with one line saying
  what came from where, and a warning when a PEFT model is left with a random base or, at evaluation, without
  trained tensors.
- Saving a training checkpoint of an injected model stores only the trainable tensors (plus optimizer,
  scheduler, iteration), so `--resume` files are megabytes; resuming loads the base from MODEL.WEIGHTS first
  and these tensors on top (the base keys they lack are expected). `full=True` stores whole models.
- Every write goes to a temporary file that is renamed into place: a kill never leaves half a checkpoint
  (`peft_d2.checkpoint.atomic_write`; the file's mode is detectron2's, 0644 modulo the umask).
"""

import logging
import os
from collections import Counter

import torch
from detectron2.checkpoint import DetectionCheckpointer
from safetensors import safe_open

from ..checkpoint import adapter_state_dict, atomic_write, load_adapter
from ..inject import peft_parameter_names

logger = logging.getLogger(__name__)


def config_buffers(model) -> set:
    """Names of the buffers that modules compute from the config (their class's `config_buffers`), e.g.
    Mask2Former's criterion.empty_weight: one weight per class, set from NUM_CLASSES and NO_OBJECT_WEIGHT."""
    out = set()
    for path, module in model.named_modules():
        for name in getattr(type(module), "config_buffers", ()):
            out.add(f"{path}.{name}" if path else name)
    return out


def grouped(keys) -> str:
    """'a.b.{bias, weight}, c.d' for keys a.b.bias, a.b.weight, c.d (fvcore's grouping of missing keys)."""
    groups = {}
    for key in sorted(keys):
        module, _, leaf = key.rpartition(".")
        groups.setdefault(module, []).append(leaf)
    return ", ".join(f"{m}.{{{', '.join(v)}}}" if len(v) > 1 else (f"{m}.{v[0]}" if m else v[0])
                     for m, v in groups.items())


def _shapes(fresh: dict, where: str) -> str:
    """'shape (5, 32) in <where>, (6, 32) here' for the tensor of most dimensions among `fresh` {key: (file's shape,
    model's shape)}."""
    there, here = max(fresh.values(), key=lambda shapes: len(shapes[1]))
    return f"shape {there} in {where}, {here} here"


class PeftCheckpointer(DetectionCheckpointer):
    """`full`: training checkpoints hold the whole model instead of the trainable tensors.
    `report_keys=False`: load without logging mismatching keys, for a load that `load_weights` repeats, with its
    report, once the model is injected (SFA's selection reads the base before injection).
    `supplied`: names that a later load fills (an adapter file's tensors, for a plain model it will be injected
    into): a checkpoint's of another shape is expected for them, as for the trainable tensors of a PEFT model."""

    def __init__(self, model, save_dir="", *, full: bool = False, report_keys: bool = True, supplied=(),
                 **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.full = full
        self.report_keys = report_keys
        self.supplied = set(supplied)
        self.fresh = {}  # trainable key -> (shape in the last checkpoint loaded, in the model): left at its init
        self._report_fresh = True

    @property
    def _peft(self):
        return getattr(self.model, "peft_config", None) is not None

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        partial = self._peft and not self.full
        data = {"model": adapter_state_dict(self.model) if partial else self.model.state_dict()}
        data["peft_partial"] = partial
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}" + (" (trainable tensors only)" if partial else ""))
        atomic_write(path, lambda tmp: torch.save(data, tmp))
        self.tag_last_checkpoint(basename)

    def _load_model(self, checkpoint):
        self._loading_partial = bool(checkpoint.get("peft_partial", False))
        self._loaded_keys = list(checkpoint["model"])
        if self._loading_partial:
            # Complete the partial state with the model's own tensors: loading a partial dict would let
            # modules such as FrozenBatchNorm2d reset the buffers it lacks.
            full = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            full.update(checkpoint["model"])
            checkpoint["model"] = full
        return super()._load_model(checkpoint)

    def _log_incompatible_keys(self, incompatible) -> None:
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad} if self._peft else set()
        trainable |= self.supplied
        derived = config_buffers(self.model)
        shapes = incompatible.incorrect_shapes
        self.fresh = {k: (there, here) for k, there, here in shapes if k in trainable}
        quiet = set(self.fresh) | {k for k, _, _ in shapes if k in derived}
        shapes[:] = [s for s in shapes if s[0] not in quiet]
        missing = incompatible.missing_keys
        missing[:] = [k for k in missing if k not in quiet]  # fvcore lists the skipped keys as missing too
        if not self.report_keys:
            return
        peft = {*peft_parameter_names(self.model), *peft_parameter_names(self.model, buffers=True)}
        n_peft = sum(k in peft for k in missing)
        if getattr(self, "_loading_partial", False):
            missing.clear()  # a PEFT training checkpoint holds trainable tensors only; the base came before
        elif n_peft:
            missing[:] = [k for k in missing if k not in peft]
            self.logger.info(f"{n_peft} PEFT tensors are not in this base checkpoint (expected: they are new)")
        if self.fresh and self._report_fresh:
            self.logger.info(f"{grouped(self.fresh)}: {_shapes(self.fresh, 'this checkpoint')}; they keep their "
                             "initialisation until trained or loaded from an adapter file")
        super()._log_incompatible_keys(incompatible)

    def describe(self, names, whole: bool = False) -> str:
        """'14 tensors (lora: 8, trainable base tensors: 6)' for tensor names of the model (`whole`: the names of a
        whole model's checkpoint, whose base tensors are not all trainable)."""
        methods = {**peft_parameter_names(self.model, buffers=True), **peft_parameter_names(self.model)}
        counts = Counter(methods.get(n, "") for n in names)
        parts = [f"{m}: {c}" for m, c in sorted(counts.items()) if m]
        if counts[""]:
            parts.append(f"{'' if whole else 'trainable '}base tensors: {counts['']}")
        return f"{len(names)} tensors ({', '.join(parts)})"

    def load_weights(self, base: str, adapter: str = "", *, resume: bool = False, check_base: bool = True,
                     eval_only: bool = False, keys=("MODEL.WEIGHTS", "MODEL.PEFT.WEIGHTS")) -> None:
        """Load the base checkpoint `base`, then with `resume` the last checkpoint of save_dir when there is one,
        otherwise the adapter file `adapter` (its base checked unless `check_base` is False), and log what came
        from where: one line for the checkpoint or adapter (its tensors, and the trainable tensors of another
        shape in the base that it fills, e.g. a class head for another class count), and a warning when the
        frozen base stays random (no `base`) or when `eval_only` evaluates PEFT tensors nothing trained.
        `keys`: the config keys of `base` and `adapter`, named in the messages."""
        base_key, adapter_key = keys
        if not self._peft:  # a plain model, or PEFT in a part of it (MODEL.BACKBONE.NAME "PEFTBackbone")
            if base:
                self.load(base, checkpointables=[])
            if resume and self.has_checkpoint():
                self.resume_or_load("", resume=True)
            elif adapter:
                load_adapter(self.model, adapter, check_base=check_base)
            return
        self.fresh, self._report_fresh = {}, False
        try:
            if base:
                self.load(base, checkpointables=[])
        finally:
            self._report_fresh = True
        fresh = dict(self.fresh)
        resumed = self.get_checkpoint_file() if resume and self.has_checkpoint() else ""
        if resumed:
            self.resume_or_load("", resume=True)
            names, whole = self._loaded_keys, not self._loading_partial
            line = f"Resumed from {resumed}: {self.describe(names, whole)}"
        elif adapter:
            load_adapter(self.model, adapter, check_base=check_base)
            with safe_open(adapter, framework="pt") as f:
                names, whole = list(f.keys()), False
            line = f"Adapter {adapter} loaded: {self.describe(names)}"
        else:
            names, whole, line = [], False, ""
        filled = {k: v for k, v in fresh.items() if k in set(names)}
        left = {k: v for k, v in fresh.items() if k not in filled}
        if filled:
            line += f"; {grouped(filled)} from it ({_shapes(filled, base_key)})"
        if resumed and adapter:
            line += f"; {adapter_key} {adapter} is not loaded: this checkpoint holds the trained tensors"
        if line:
            logger.info(line)
        if not base and not whole:
            logger.warning(f"{base_key} is empty: the frozen base of this PEFT model keeps its random initialisation "
                           f"(set {base_key} to the pretrained base checkpoint)")
        if names and left:
            logger.warning(f"{grouped(left)} keep their random initialisation: {_shapes(left, base_key)}, and "
                           f"{resumed or adapter} does not hold them")
        elif not names and eval_only:
            head = f" and a randomly initialised {grouped(left)} ({_shapes(left, base_key)})" if left else ""
            logger.warning(f"{adapter_key} is empty and there is no training checkpoint to resume: this evaluates "
                           f"untrained PEFT tensors{head}; set {adapter_key} to the adapter file of a training run "
                           "(its adapter_final.safetensors)")
        elif not names and left:
            logger.info(f"{grouped(left)}: {_shapes(left, base_key)}: initialised afresh, trained in this run")


def load_adapted_model(cfg, adapter: str):
    """The model an adapter file was trained into: MODEL.PEFT.BASE_META_ARCHITECTURE built from `cfg` (a PEFT
    config), MODEL.WEIGHTS loaded, the file's own PeftConfig injected and its tensors loaded (SFA files bring their
    selection). What tools/merge_adapter.py folds and tools/export_model.py exports."""
    from ..build import build_base_model
    from ..checkpoint import inject_from_checkpoint, read_adapter

    model = build_base_model(cfg)
    if cfg.MODEL.WEIGHTS:  # the base tensors the adapter file holds (a class head for another class count) may
        # differ in shape: the file fills them, so their mismatch is no warning
        tensors, _, _ = read_adapter(adapter)
        PeftCheckpointer(model, supplied=tensors).load(cfg.MODEL.WEIGHTS, checkpointables=[])
    inject_from_checkpoint(model, adapter, check_base=cfg.MODEL.PEFT.CHECK_BASE)
    return model
