"""Where a study's data, base and runs are cached: once per machine, shared by every clone, keyed by what made
them (`fingerprint`), built under a lock into a temporary folder that becomes the real one only when complete."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable

__all__ = ["ROOT", "cache_root", "fingerprint", "Lock", "locked_build"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


def cache_root() -> str:
    """$PEFT_D2_HOME, else $XDG_CACHE_HOME/peft_d2, else ~/.cache/peft_d2."""
    return os.environ.get("PEFT_D2_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "peft_d2"
    )


def fingerprint(paths, *extra) -> str:
    """sha256 (12 hex digits) of the contents of the files under `paths` (relative to ROOT) and of `extra`."""
    h = hashlib.sha256()
    for rel in paths:
        full = os.path.join(ROOT, rel)
        files = [full] if os.path.isfile(full) else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(full) for f in fs
            if f.endswith((".py", ".yaml", ".cpp", ".cu", ".h", ".cuh")))  # fmt: skip
        for f in files:
            h.update(os.path.relpath(f, ROOT).encode())
            with open(f, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()[:12]


class Lock:
    """An exclusive lock on `path` (two studies on one machine wait for each other instead of racing)."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.f = open(path, "w")

    def __enter__(self):
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def locked_build(folder: str, build: Callable[[str], object]) -> str:
    """`folder`, built once by build(tmp) into a temporary sibling that is renamed into place when it returns."""
    with Lock(folder + ".lock"):
        if not os.path.exists(os.path.join(folder, "ready")):
            tmp = tempfile.mkdtemp(dir=os.path.dirname(folder), prefix=".build-")
            build(tmp)
            open(os.path.join(tmp, "ready"), "w").close()
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
    return folder
