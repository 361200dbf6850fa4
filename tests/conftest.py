import logging
import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same generators, whichever xdist worker runs it and whatever ran before it
    (detectron2's augmentations draw from numpy's and Python's global generators)."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


@pytest.fixture(autouse=True)
def _propagating_loggers():
    """Every test sees the library's records in caplog, whatever ran before it in its worker: the tools under test
    call detectron2's setup_logger, which stops these loggers from propagating to the root logger (caplog's)."""
    loggers = [logging.getLogger(name) for name in ("peft_d2", "detectron2", "fvcore")]
    saved = [lg.propagate for lg in loggers]
    yield
    for lg, propagate in zip(loggers, saved):
        lg.propagate = propagate


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
