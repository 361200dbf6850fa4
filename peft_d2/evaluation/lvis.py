"""detectron2's LVISEvaluator, runnable under NumPy >= 1.24.

The `lvis` package (0.5.3, the last release) accumulates precision with `np.float`, an alias of the builtin
`float` that NumPy 1.24 removed, so `LVISEval.accumulate` raises AttributeError on any current NumPy. While it
evaluates, `LVISEvaluator` hands lvis' evaluation module a view of NumPy in which `float` is the builtin again
(what `np.float` always was); NumPy itself and every other module are left alone.
"""

from __future__ import annotations

import contextlib
import types

import numpy
from detectron2.evaluation import LVISEvaluator as _D2LVISEvaluator

__all__ = ["LVISEvaluator", "lvis_numpy_compat"]


class _NumpyWithFloat(types.ModuleType):
    """numpy, plus the `float` alias it dropped in 1.24."""

    float = float

    def __getattr__(self, name):
        return getattr(numpy, name)


@contextlib.contextmanager
def lvis_numpy_compat():
    """Within the block, `lvis.eval` sees `np.float` (= float) if the installed NumPy lacks it."""
    import lvis.eval as lvis_eval

    if hasattr(numpy, "float") or isinstance(lvis_eval.np, _NumpyWithFloat):
        yield
        return
    original = lvis_eval.np
    lvis_eval.np = _NumpyWithFloat("numpy")
    try:
        yield
    finally:
        lvis_eval.np = original


class LVISEvaluator(_D2LVISEvaluator):
    """detectron2's LVISEvaluator (same arguments and results), evaluated under `lvis_numpy_compat`."""

    def evaluate(self):
        with lvis_numpy_compat():
            return super().evaluate()
