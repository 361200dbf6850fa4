"""Training hooks: adapter export and the parameter report in metrics.json / TensorBoard."""

import os

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..checkpoint import save_adapter
from ..inject import parameter_report


class AdapterExportHook(HookBase):
    """Writes OUTPUT_DIR/adapter_<iter>.safetensors every `period` iterations and adapter_final at the end."""

    def __init__(self, model, output_dir: str, period: int):
        self.model, self.output_dir, self.period = model, output_dir, period

    def _save(self, tag):
        if comm.is_main_process():
            save_adapter(self.model, os.path.join(self.output_dir, f"adapter_{tag}.safetensors"),
                         {"iteration": self.trainer.iter})

    def after_step(self):
        it = self.trainer.iter + 1
        if self.period > 0 and it % self.period == 0 and it != self.trainer.max_iter:
            self._save(f"{it - 1:07d}")

    def after_train(self):
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            self._save("final")


class ParameterReportHook(HookBase):
    """Puts the trainable/total counts (overall and per method) into the event storage at the start."""

    def __init__(self, model):
        self.model = model

    def before_train(self):
        report = parameter_report(self.model)
        scalars = {"peft/trainable_params": report["trainable"], "peft/total_params": report["total"],
                   "peft/trainable_percent": report["percent"]}
        scalars.update({f"peft/params_{m}": n for m, n in report["by_method"].items()})
        self.trainer.storage.put_scalars(smoothing_hint=False, **scalars)
