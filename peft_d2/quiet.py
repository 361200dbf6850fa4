"""Quiet command-line output: third-party notices that a user of peft_d2 cannot act on, silenced narrowly.

Each filter names the notice's message, its category and the module it is attributed to, and says why it is noise
here; any other warning, and every warning of peft_d2's own, still shows. `quiet_third_party_notices()` is called
by the command-line tools (tools/train_net.py, tools/lazyconfig_train_net.py, tools/merge_adapter.py,
datasets/prepare_synthetic.py) before they import detectron2, whose imports raise most of these notices, and so
again in every process that `--num-gpus` or a data-loader worker spawns. Importing peft_d2 changes no filter.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["LOG_FILTERS", "WARNING_FILTERS", "quiet_third_party_notices"]

# (message regex, category, module regex) for warnings.filterwarnings; the comment above each says who raises it
WARNING_FILTERS = (
    # fvcore.nn (its focal losses) and detectron2.modeling.box_regression script functions with torch.jit.script at
    # import: torch's notice to them, not to the user (TorchScript still runs); two per process, and again in every
    # process --num-gpus and the data loaders spawn
    (r"`torch\.jit\.script` is deprecated", FutureWarning, r"torch\.jit\._script"),
    # timm's hrnet declares a torch.jit.interface at import (timm.models is imported through timm.models.layers)
    (r"`torch\.jit\.interface` is deprecated", FutureWarning, r"torch\.jit\._script"),
    # detectron2's ViT blocks import DropPath and Mlp from timm.models.layers, timm's deprecated alias of timm.layers
    (r"Importing from timm\.models\.layers is deprecated", FutureWarning, r"timm\.models\.layers"),
    # detectron2.model_zoo (which LazyConfigs import for the model zoo's configs) imports pkg_resources
    (r"pkg_resources is deprecated as an API", UserWarning, r"detectron2\."),
    # detectron2's anchor generator calls torch.meshgrid without `indexing`; it wants "ij", which is the default
    (r"torch\.meshgrid: in an upcoming release, it will be required", UserWarning, r"torch\.functional"),
    # detectron2's DefaultTrainer builds DDP with broadcast_buffers=False, which torch deprecates for
    # forward_sync_buffers; the notice itself says to keep broadcast_buffers=False until torch has init_sync_buffers
    (r"`broadcast_buffers` is deprecated", FutureWarning, r"detectron2\.engine\.defaults"),
    # detectron2 wraps pycocotools' read-only decoded masks in tensors only to torch.stack (copy) them: none is written
    (r"The given NumPy array is not writable", UserWarning, r"detectron2\.data\.detection_utils"),
)

# (logger name, message prefix): records dropped from that logger
LOG_FILTERS = (
    # detectron2's environment report (default_setup) imports torch.utils.cpp_extension, which logs this when it
    # finds a CUDA toolkit (nvcc) but no GPU; the tools say themselves when they run on the CPU
    ("torch.utils.cpp_extension", "No CUDA runtime is found"),
)


class _DropMessage(logging.Filter):
    """Drops the records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_third_party_notices() -> None:
    """Install WARNING_FILTERS and LOG_FILTERS (once per process; calling it again adds nothing)."""
    for message, category, module in WARNING_FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefix in LOG_FILTERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))
