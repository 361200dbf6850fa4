"""Training hooks: adapter export and the parameter report in metrics.json / TensorBoard; the metrics.json writer."""

import os

from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils import events as d2_events
from detectron2.utils.file_io import PathManager

from ..checkpoint import save_adapter
from ..inject import parameter_report


class AdapterExportHook(HookBase):
    """Writes OUTPUT_DIR/adapter_<iter>.safetensors every `period` iterations and adapter_final at the end: the
    files detectron2's PeriodicCheckpointer writes as model_<iter>.pth and model_final.pth."""

    def __init__(self, model, output_dir: str, period: int):
        self.model, self.output_dir, self.period = model, output_dir, period

    def _save(self, tag):
        if comm.is_main_process():
            save_adapter(self.model, os.path.join(self.output_dir, f"adapter_{tag}.safetensors"),
                         {"iteration": self.trainer.iter})

    def after_step(self):
        it = self.trainer.iter + 1
        if self.period > 0 and it % self.period == 0:
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


class _OpenedOnWrite:
    """A file opened for appending at its first write (JSONWriter's handle)."""

    def __init__(self, path: str):
        self.path, self.file = path, None

    def write(self, text: str) -> None:
        if self.file is None:
            self.file = PathManager.open(self.path, "a")
        self.file.write(text)

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def fileno(self) -> int:
        if self.file is None:
            raise AttributeError("not opened yet")  # JSONWriter.write skips its fsync
        return self.file.fileno()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class JSONWriter(d2_events.JSONWriter):
    """detectron2's JSONWriter (metrics.json), which opens its file at the first metrics it writes rather than
    when it is built: a run that fails before any metrics leaves no empty metrics.json."""

    def __init__(self, json_file: str, window_size: int = 20):
        super().__init__(os.devnull, window_size)
        self._file_handle.close()
        self._file_handle = _OpenedOnWrite(json_file)
