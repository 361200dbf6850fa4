"""`PeftCheckpointer`: detectron2's checkpointer, aware of PEFT.

- Loading a base checkpoint (MODEL.WEIGHTS) into an injected model: the PEFT tensors it cannot contain are
  reported in one line instead of a warning per tensor.
- Saving a training checkpoint of an injected model stores only the trainable tensors (plus optimizer,
  scheduler, iteration), so `--resume` files are megabytes; resuming loads the base from MODEL.WEIGHTS first
  and these tensors on top (the base keys they lack are expected). `full=True` stores whole models.
- Every write goes to a temporary file that is renamed into place: a kill never leaves half a checkpoint
  (`peft_d2.checkpoint.atomic_write`; the file's mode is detectron2's, 0644 modulo the umask).
"""

import os

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..checkpoint import adapter_state_dict, atomic_write
from ..inject import peft_parameter_names


class PeftCheckpointer(DetectionCheckpointer):
    def __init__(self, model, save_dir="", *, full: bool = False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.full = full

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
        if self._loading_partial:
            # Complete the partial state with the model's own tensors: loading a partial dict would let
            # modules such as FrozenBatchNorm2d reset the buffers it lacks.
            full = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            full.update(checkpoint["model"])
            checkpoint["model"] = full
        return super()._load_model(checkpoint)

    def _log_incompatible_keys(self, incompatible) -> None:
        peft = set(peft_parameter_names(self.model))
        missing = incompatible.missing_keys
        n_peft = sum(k in peft for k in missing)
        if getattr(self, "_loading_partial", False):
            missing.clear()  # a PEFT training checkpoint holds trainable tensors only; the base came before
        elif n_peft:
            missing[:] = [k for k in missing if k not in peft]
            self.logger.info(f"{n_peft} PEFT tensors are not in this base checkpoint (expected: they are new)")
        super()._log_incompatible_keys(incompatible)
