"""The README's training section runs as written.

Its command blocks are read from README.md itself (so an edit of the README is what is tested) and run in
sequence, each as `python SCRIPT ARGS` would run it (the script as __main__, with that argv), in a scratch folder
that plays the fresh clone: `configs` linked in, no DETECTRON2_DATASETS (the data go to ./datasets), outputs
under ./output. Tiny settings are appended to each command (a few 64 px images, 2 iterations); each step's
outputs are checked, and that the chain holds: the fine-tuning starts from the pretrained base, the evaluation
uses the adapter (its predictions are the fine-tuning's own final ones) and the merged checkpoint predicts what
the adapter does. Then the block of "Your own dataset" runs on a tiny COCO-format dataset written at the paths
its --dataset options name. The LazyConfig section's CPU block (the tiny ViTDet on the synthetic data) runs in a
test of its own; its blocks at scale need COCO and 8 GPUs.
"""

from __future__ import annotations

import json
import os
import runpy
import shlex
import sys
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

from _models import write_coco_dataset  # noqa: E402
from detectron2.config import CfgNode  # noqa: E402

from peft_d2.data.datasets.coco_instances import parse_coco_spec  # noqa: E402

# pycocotools under numpy 2 warns on every mask decode
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

ROOT = Path(__file__).resolve().parents[1]
TRAINING = "## Training: `tools/train_net.py`"
OWN_DATASET = "### Your own dataset: `--dataset NAME=ANNOTATIONS.json:IMAGE_ROOT`"
EXPORT = "### Export: ONNX, torch.export, TorchScript"
LAZY = "### LazyConfigs: `tools/lazyconfig_train_net.py`"

# appended to each command of a script: the same run, small
TINY = {
    "datasets/prepare_synthetic.py": ["--num-train-a", "8", "--num-train-b", "4", "--num-val", "2",
                                      "--image-size", "64"],
    "tools/train_net.py": ["INPUT.IMAGE_SIZE", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
                           "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()",
                           "DATALOADER.NUM_WORKERS", "0"],
    "tools/merge_adapter.py": [],
    "tools/export_model.py": ["--image-size", "64", "64"],
    "tools/lazyconfig_train_net.py": ["train.max_iter=2"],
}


def readme_blocks(heading: str, text: str | None = None) -> list[list[list[str]]]:
    """The ```bash blocks between the heading line `heading` and the next heading, each a list of commands
    (argv lists): continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text(encoding="utf-8") if text is None else text
    lines = text.splitlines()
    assert heading in lines, f"README.md has no heading {heading!r}"
    blocks, fence, inside = [], None, False
    for line in lines[lines.index(heading) + 1:]:
        if fence is not None:
            if line.startswith("```"):
                if inside:
                    commands = "\n".join(fence).replace("\\\n", " ").splitlines()
                    blocks.append([argv for argv in (shlex.split(c, comments=True) for c in commands) if argv])
                fence = None
            else:
                fence.append(line)
        elif line.startswith("```"):
            fence, inside = [], line.strip() == "```bash"
        elif line.startswith("#"):
            break  # the next heading
    return blocks


def test_readme_blocks_join_continuations_and_drop_comments():
    text = ("## A\n```python\nx = 1\n```\n```bash\npython x.py --a 1 \\\n    B 'c d'  # note\n# a comment line\n\n```\n"
            "### B\n```bash\nno\n```\n")
    assert readme_blocks("## A", text) == [[["python", "x.py", "--a", "1", "B", "c d"]]]
    assert readme_blocks("### B", text) == [[["no"]]]


def _opt(argv: list[str], key: str) -> str:
    """The value after `key` in a command line (a flag or a KEY VALUE override); it must be there once."""
    hits = [i for i, a in enumerate(argv) if a == key]
    assert len(hits) == 1 and hits[0] + 1 < len(argv), f"{key} once in {shlex.join(argv)}"
    return argv[hits[0] + 1]


def _opts(argv: list[str], flag: str) -> list[str]:
    """Every value of a repeatable flag."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def _run(argv: list[str]) -> None:
    """`python SCRIPT ARGS` in this process: SCRIPT (a path of the repository) as __main__, ARGS and the tiny
    settings as its sys.argv."""
    assert argv[0] == "python" and argv[1] in TINY, f"not a command this test knows: {shlex.join(argv)}"
    script = argv[1]
    saved = sys.argv, list(sys.path)
    sys.argv = [script, *argv[2:], *TINY[script]]
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:
        assert e.code in (None, 0), f"{shlex.join(argv)} exited with {e.code}"
    finally:
        sys.argv, sys.path[:] = saved


def _kind(argv: list[str]) -> str:
    script = os.path.basename(argv[1])
    return f"{script} --eval-only" if "--eval-only" in argv else script


def _predictions(out_dir: Path) -> list[dict]:
    return json.loads((out_dir / "inference" / "coco_instances_results.json").read_text())


@pytest.fixture
def fresh_clone(tmp_path, monkeypatch):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_training_section_runs_as_written(fresh_clone):
    blocks = readme_blocks(TRAINING)
    assert blocks, f"no bash block under {TRAINING!r}"
    commands = blocks[0]
    kinds = [_kind(c) for c in commands]
    assert kinds == ["prepare_synthetic.py", "train_net.py", "train_net.py", "train_net.py --eval-only",
                     "merge_adapter.py", "train_net.py --eval-only"], (
        f"the README's training block changed its steps ({kinds}): update this test with it")
    prepare, pretrain, finetune, evaluate, merge, merged_eval = commands
    here = fresh_clone

    _run(prepare)
    for domain in "AB":
        for split in ("train", "val"):
            assert (here / "datasets" / "synthetic" / domain / "annotations" / f"instances_{split}.json").is_file()

    _run(pretrain)
    base = here / _opt(pretrain, "OUTPUT_DIR") / "model_final.pth"
    assert base.is_file()

    _run(finetune)
    tuned = here / _opt(finetune, "OUTPUT_DIR")
    adapter = tuned / "adapter_final.safetensors"
    assert adapter.is_file()
    used = CfgNode.load_yaml_with_base(str(tuned / "config.yaml"))
    assert (here / used["MODEL"]["WEIGHTS"]).resolve() == base.resolve(), (
        "the fine-tuning did not start from the pretrained base")

    _run(evaluate)
    assert (here / _opt(evaluate, "MODEL.PEFT.WEIGHTS")).resolve() == adapter.resolve()
    evaluated = _predictions(here / _opt(evaluate, "OUTPUT_DIR"))
    # the fine-tuning's last evaluation ran the trained model: the same predictions mean the adapter was loaded
    # (without it, LoRA is zero and the new class head is a fresh random one)
    assert evaluated and evaluated == _predictions(tuned)

    _run(merge)
    assert (here / _opt(merge, "--adapter")).resolve() == adapter.resolve()
    merged = here / _opt(merge, "--output")
    assert merged.is_file() and Path(f"{merged}.yaml").is_file()

    _run(merged_eval)
    assert (here / _opt(merged_eval, "--config-file")).resolve() == Path(f"{merged}.yaml").resolve()
    # folding LoRA into the weights changes the float sums only: the same detections, scores to 1e-4
    key = lambda p: (p["image_id"], p["category_id"], p["score"])  # noqa: E731
    folded = sorted(_predictions(here / _opt(merged_eval, "OUTPUT_DIR")), key=key)
    evaluated = sorted(evaluated, key=key)
    assert [p["category_id"] for p in folded] == [p["category_id"] for p in evaluated]
    assert [p["score"] for p in folded] == pytest.approx([p["score"] for p in evaluated], abs=1e-4)

    # the export of the fine-tuned adapter: ONNX Runtime runs it and agrees with the eager model
    blocks = readme_blocks(EXPORT)
    assert len(blocks) == 1 and [_kind(c) for c in blocks[0]] == ["export_model.py"], (
        "the README's export block changed its steps: update this test with it")
    (export,) = blocks[0]
    assert (here / _opt(export, "--adapter")).resolve() == adapter.resolve()
    _run(export)
    out = here / _opt(export, "--output")
    manifest = json.loads((out / "export.json").read_text())
    assert (out / manifest["file"]).is_file() and manifest["merged"] == ["lora"] and manifest["kept"] == []
    for check in manifest["largest_difference_to_eager"].values():
        assert all(v <= (1e-4 if isinstance(v, float) else 0) for v in check.values()), check

    # your own dataset, on the base pretrained above
    blocks = readme_blocks(OWN_DATASET)
    assert len(blocks) == 1 and [_kind(c) for c in blocks[0]] == ["train_net.py", "train_net.py --eval-only"], (
        "the README's own-dataset block changed its steps: update this test with it")
    train, evaluate = blocks[0]
    categories = [{"id": 1, "name": "nucleus"}, {"id": 2, "name": "cell"}]
    specs = _opts(train, "--dataset")
    assert len(specs) == 2
    for seed, spec in enumerate(specs):
        _, json_file, image_root = parse_coco_spec(spec)
        write_coco_dataset(here / json_file, here / image_root, 4, categories, seed=seed)

    _run(train)
    out = here / _opt(train, "OUTPUT_DIR")
    assert (out / "adapter_final.safetensors").is_file()
    used = CfgNode.load_yaml_with_base(str(out / "config.yaml"))
    assert used["DATASETS"]["COCO_INSTANCES"] == specs
    assert used["MODEL"]["SEM_SEG_HEAD"]["NUM_CLASSES"] == 2  # from the file (the config says 5)
    assert (here / used["MODEL"]["WEIGHTS"]).resolve() == base.resolve()

    _run(evaluate)
    assert (here / _opt(evaluate, "--config-file")).resolve() == (out / "config.yaml").resolve()
    assert (here / _opt(evaluate, "MODEL.PEFT.WEIGHTS")).resolve() == (out / "adapter_final.safetensors").resolve()
    evaluated = _predictions(here / _opt(evaluate, "OUTPUT_DIR"))
    assert evaluated and evaluated == _predictions(out)
    assert {p["category_id"] for p in evaluated} <= {1, 2}


@pytest.mark.slow
def test_lazyconfig_cpu_block_runs_as_written(fresh_clone):
    blocks = readme_blocks(LAZY)
    assert blocks, f"no bash block under {LAZY!r}"
    commands = blocks[0]
    assert [_kind(c) for c in commands] == ["prepare_synthetic.py", "lazyconfig_train_net.py"], (
        "the README's LazyConfig CPU block changed its steps: update this test with it")
    prepare, train = commands
    _run(prepare)
    _run(train)
    (out,) = (a.split("=", 1)[1] for a in train if a.startswith("train.output_dir="))
    out = fresh_clone / out
    assert (out / "adapter_final.safetensors").is_file() and (out / "model_final.pth").is_file()
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "loss_cls" in r] == [0, 1]  # 2 iterations
    assert any("segm/AP" in r for r in rows)  # and the evaluation at the end
