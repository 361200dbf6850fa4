#!/usr/bin/env bash
# Creates (or reuses) the peft_d2 virtual environment and installs peft_d2 from this checkout.
#
# The environment is large (torch with CUDA runtime wheels, ~5.5 GB), so it lives outside the clone,
# keyed by a hash of the requirement files: every clone on the machine shares it, and a change of pins
# makes a new one. `.venv` in the checkout is a symlink to it. Prints nothing but progress on stderr.
#
# Environment variables:
#   PEFT_D2_PYTHON   use this existing interpreter (your own env with torch/detectron2) instead of a venv
#   PEFT_D2_HOME     where environments live (default: ${XDG_CACHE_HOME:-~/.cache}/peft_d2)
#   PYTHON           the interpreter that creates the venv (default: python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQ="$ROOT/requirements/requirements.txt"
CON="$ROOT/requirements/constraints.txt"
log() { echo "[setup_env] $*" >&2; }
# pip's exit status is kept; only the local index's noise about missing mirror folders is dropped
pipq() { "$PY" -m pip "$@" > >(grep -v "is ignored: it is neither" >&2) 2>&1; }

if [[ -n "${PEFT_D2_PYTHON:-}" ]]; then
  PY="$PEFT_D2_PYTHON"
else
  HOME_DIR="${PEFT_D2_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/peft_d2}"
  ENV_REVISION=1  # bump when a change below must rebuild existing environments
  KEY="$( (cat "$REQ" "$CON"; echo "$ENV_REVISION") | sha256sum | cut -c1-12)"
  VENV="$HOME_DIR/venv-$KEY"
  PY="$VENV/bin/python"
  mkdir -p "$HOME_DIR"
  exec 9>"$HOME_DIR/.lock-$KEY"
  flock 9  # two clones setting up at once wait for each other instead of corrupting one venv
  if [[ ! -f "$VENV/.peft_d2_ready" ]]; then
    start=$(date +%s)
    log "creating $VENV (one time; about 2-3 minutes)"
    rm -rf "$VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
    pipq install -q --upgrade pip setuptools wheel -c "$CON"
    pipq install -q -c "$CON" -r "$REQ"
    touch "$VENV/.peft_d2_deps"
    log "dependencies installed in $(( $(date +%s) - start ))s"
  fi
  ln -sfn "$VENV" "$ROOT/.venv"
fi

# detectron2: keep any build that imports; otherwise the registry redistribution (pure Python, the
# cp310 tag is a packaging accident: its only binary is the optional detectron2._C).
if ! "$PY" -c "import detectron2" 2>/dev/null; then
  log "installing detectron2 (sal-detectron2 0.7.2 redistribution)"
  tmp="$(mktemp -d)"
  pipq download -q --no-deps --only-binary=:all: --python-version 3.10 -d "$tmp" sal-detectron2==0.7.2
  cp "$tmp"/sal_detectron2-0.7.2-*.whl "$tmp/sal_detectron2-0.7.2-py3-none-any.whl"
  pipq install -q --no-deps "$tmp/sal_detectron2-0.7.2-py3-none-any.whl"
  rm -rf "$tmp"
fi
# lvis (LVISEvaluator) without its declared opencv-python: the headless OpenCV we pin provides cv2 just the same.
if ! "$PY" -c "import lvis" 2>/dev/null; then
  pipq install -q --no-deps lvis==0.5.3
fi
# Evaluation packages installed here rather than in requirements/ (which would change the venv's hash and
# rebuild every machine's 5 GB environment): each step is skipped once the package imports.
# cityscapesscripts (Cityscapes evaluators) without its declared `typing` backport (stdlib on Python 3) and the
# dependencies of its downloader and 3D-box evaluation only (appdirs, coloredlogs, requests); the instance and
# semantic evaluations import pyquaternion through its annotation helpers.
if ! "$PY" -c "import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling" 2>/dev/null; then
  pipq install -q --no-deps cityscapesscripts==2.3.0
  pipq install -q -c "$CON" pyquaternion==0.9.9
fi
# shapely: detectron2's Cityscapes instance loader rasterizes the gtFine polygons with it.
if ! "$PY" -c "import shapely" 2>/dev/null; then
  pipq install -q -c "$CON" shapely==2.2.0
fi
# torchmetrics (PanopticQuality for peft_d2.evaluation.PanopticEvaluator), with torch held at its pin.
if ! "$PY" -c "import torchmetrics" 2>/dev/null; then
  pipq install -q -c "$CON" torchmetrics==1.9.0
fi
# onnx and onnxruntime (tools/export_model.py), every version pinned in requirements/export.txt.
if ! "$PY" -c "import onnx, onnxruntime" 2>/dev/null; then
  pipq install -q -c "$CON" -r "$ROOT/requirements/export.txt"
fi
[[ -n "${VENV:-}" ]] && touch "$VENV/.peft_d2_ready"

# The official Mask2Former code, unpacked (never installed) as the reference of the parity tests.
REFS="${PEFT_D2_REFS:-${PEFT_D2_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/peft_d2}/refs}"
"$PY" "$ROOT/tools/fetch_reference.py" "$REFS" \
  || { log "could not fetch the maskformer2 reference; parity tests will be skipped"; [[ "${CI:-}" != "true" ]]; }

# peft_d2 itself, editable. The C++/CUDA extension is built separately, in place and incrementally
# (ninja, build/ in the checkout), so re-running after an edit only recompiles what changed.
here="$(cd / && "$PY" -c 'import os, peft_d2; print(os.path.dirname(os.path.dirname(peft_d2.__file__)))' 2>/dev/null || true)"
if [[ "$here" != "$ROOT" ]]; then
  log "installing peft_d2 from $ROOT (editable)"
  (cd "$ROOT" && PEFT_D2_NO_EXT=1 "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1) \
    || { log "pip install -e . failed"; exit 1; }
fi
if [[ "${PEFT_D2_SKIP_BUILD:-0}" != "1" ]]; then
  if ! (cd "$ROOT" && "$PY" setup.py -q build_ext --inplace >"$ROOT/build_ext.log" 2>&1); then
    if [[ "${CI:-}" == "true" || "${PEFT_D2_STRICT_BUILD:-0}" == "1" ]]; then
      tail -40 "$ROOT/build_ext.log" >&2
      log "building peft_d2._C failed (see build_ext.log)"
      exit 1
    fi
    log "building peft_d2._C failed (see build_ext.log); the operator falls back to the reference"
  fi
fi
echo "$PY"
