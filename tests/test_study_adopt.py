"""Adopting a cached base or run made by older code (peft_d2/study/adopt.py): the comparisons, the links, and the
engine reusing (or refusing) cached stages across a code change, at toy size."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest

from peft_d2.ops._extension import ENV_VAR
from peft_d2.study import adopt, engine, studies

LOSSES = {"loss_ce": 1.25, "loss_mask": 0.5, "total_loss": 1.75, "lr": 0.001}


def _metrics(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_replayed_rows_keep_losses_and_lr_of_the_first_start(tmp_path):
    rows = [{"iteration": 0, "peft/trainable_params": 10.0},
            {"iteration": 19, "time": 0.5, "data_time": 0.1, **LOSSES},
            {"iteration": 19, "time": 0.7, **dict(LOSSES, loss_ce=9.0)},  # logged again by a resumption
            {"iteration": 39, "segm/AP": 3.0, **LOSSES},
            {"iteration": 59, **LOSSES}]  # fmt: skip
    got = adopt.replayed_rows(_metrics(tmp_path / "m.json", rows), iters=40)
    assert got == {19: LOSSES, 39: LOSSES}


def test_compare_rows():
    assert adopt.compare_rows({19: LOSSES}, {19: LOSSES, 39: LOSSES}) == (0.0, None)
    worst, why = adopt.compare_rows({19: dict(LOSSES, loss_ce=1.25 * (1 + 1e-3))}, {19: LOSSES})
    assert worst == pytest.approx(1e-3) and "iteration 19: loss_ce" in why
    assert adopt.compare_rows({19: dict(LOSSES, loss_ce=1.25 * (1 + 1e-7))}, {19: LOSSES})[1] is None
    assert "iteration 39 logged" in adopt.compare_rows({39: LOSSES}, {19: LOSSES})[1]
    assert "logged" in adopt.compare_rows({19: dict(LOSSES, loss_new=1.0)}, {19: LOSSES})[1]
    assert "no training iteration" in adopt.compare_rows({}, {19: LOSSES})[1]


def test_compare_configs_ignores_cache_folders_and_allows_new_keys(tmp_path):
    cached = tmp_path / "old.yaml"
    cached.write_text("OUTPUT_DIR: /a\nMODEL:\n  WEIGHTS: /a/w.pth\n  PEFT:\n    LORA:\n      RANK: 8\nSEED: 0\n")
    new = tmp_path / "new.yaml"
    new.write_text("OUTPUT_DIR: /b\nMODEL:\n  WEIGHTS: /b/w.pth\n  PEFT:\n    LORA:\n      RANK: 8\n"
                   "      DORA: false\nSEED: 0\n")  # fmt: skip
    assert adopt.compare_configs(str(new), str(cached)) is None
    new.write_text("MODEL:\n  PEFT:\n    LORA:\n      RANK: 4\nSEED: 0\n")
    assert adopt.compare_configs(str(new), str(cached)) == "MODEL.PEFT.LORA.RANK: 4 now, 8 in the cached run"
    new.write_text("MODEL:\n  PEFT:\n    LORA:\n      RANK: 8\n")
    assert adopt.compare_configs(str(new), str(cached)) == "SEED is in the cached config, not in the current one"


def test_same_spec_sets_aside_the_folders_it_names():
    spec = {"config": "/clone/configs/dsb2018/peft/lora_backbone.yaml", "threads": 1, "eval": ["x_test"],
            "opts": ["SEED", "0", "MODEL.WEIGHTS", "/h/dsb2018/pretrain-0123456789ab/model_final.pth"],
            "out_dir": "/home/.cache/peft_d2/dsb2018/runs-0123456789ab/lora-1.tmp"}  # fmt: skip
    other = dict(spec, config="/other-clone/configs/dsb2018/peft/lora_backbone.yaml", out_dir="/x",
                 opts=["SEED", "0", "MODEL.WEIGHTS", "/elsewhere/dsb2018/pretrain-ba9876543210/model_final.pth"])
    assert adopt.same_spec(spec, other)
    assert not adopt.same_spec(spec, dict(other, opts=["SEED", "1", *other["opts"][2:]]))
    assert not adopt.same_spec(spec, dict(other, config="/clone/configs/dsb2018/peft/prefix.yaml"))
    assert not adopt.same_spec(spec, dict(other, threads=2))


def test_link_adopted_links_the_files_and_leaves_the_cached_folder_alone(tmp_path):
    cached = tmp_path / "runs-old" / "lora-seed0"
    (cached / "inference").mkdir(parents=True)
    (cached / "result.json").write_text(json.dumps({"AP": 12.5}))
    (cached / "model_final.pth").write_bytes(b"weights")
    before = {p: p.read_bytes() for p in cached.iterdir() if p.is_file()}
    target = tmp_path / "runs-new" / "lora-seed0"
    target.parent.mkdir()
    adopt.link_adopted(str(cached), str(target), {"from": str(cached), "AP": 12.5})
    assert json.loads((target / "result.json").read_text()) == {"AP": 12.5, "adopted": {"from": str(cached),
                                                                                         "AP": 12.5}}
    assert (target / "model_final.pth").read_bytes() == b"weights" and (target / "inference").is_dir()
    assert json.loads((target / "adopted.json").read_text())["from"] == str(cached)
    assert {p: p.read_bytes() for p in cached.iterdir() if p.is_file()} == before
    assert not os.path.exists(str(target) + ".adopting")


def _changed(study, path):
    """The study as if the code under `path` (a file of the repository) had changed: new cache keys."""
    return dataclasses.replace(study, pretrain_code=(*study.pretrain_code, path), run_code=(*study.run_code, path))


@pytest.mark.slow
def test_a_code_change_that_changes_no_number_reuses_the_base_and_runs(tmp_path, monkeypatch, capsys):
    """Toy size: a base and two runs of one method; then the cache keys change (as after any edit of peft_d2/)
    and the base and both runs are adopted after replaying the base and one run; a cached run whose numbers the
    code no longer reproduces (its logged loss altered here) is refused and run again."""
    monkeypatch.setenv("PEFT_D2_HOME", str(tmp_path / "home"))
    study = studies.synthetic(smoke=True)
    runs = [("lora_backbone", 0, 1.0, "val"), ("lora_backbone", 1, 1.0, "val")]
    old = engine.Plan(study, 4, 5, workers=2)
    old_base = old.pretrain()
    old_runs = old.run_many(runs)

    new = engine.Plan(_changed(study, "README.md"), 4, 5, workers=2)
    assert new.pretrain_key != old.pretrain_key and new.run_dir(*runs[0]) != old.run_dir(*runs[0])
    capsys.readouterr()
    base = new.pretrain()
    assert base["adopted"]["from"] == os.path.realpath(old.pretrain_dir)
    assert {k: v for k, v in base.items() if k != "adopted"} == old_base
    new_runs = new.run_many(runs[:1]) + new.run_many(runs[1:])  # the method is replayed once
    assert [{k: v for k, v in r.items() if k != "adopted"} for r in new_runs] == old_runs
    first = os.path.realpath(old.run_dir(*runs[0]))
    assert new_runs[0]["adopted"]["from"] == new_runs[1]["adopted"]["replayed_run"] == first
    text = capsys.readouterr().out
    assert "base pretrained on A: adopted" in text and "(replayed 4 iterations" in text  # all the base had
    assert text.count("largest relative difference 0.0e+00") == 2  # the base and the first run
    assert text.count("lora_backbone: adopted 1 cached run(s)") == 2
    left = sorted(os.listdir(os.path.dirname(new.run_dir(*runs[0]))))
    assert left == sorted(os.path.basename(new.run_dir(*r)) for r in runs)  # no replay folder is left

    # the cached run's record altered: the code no longer reproduces it, so it is refused and run again
    metrics = os.path.join(old.run_dir(*runs[0]), "metrics.json")
    rows = [json.loads(x) for x in open(metrics)]
    for r in rows:
        r.update({"loss_ce": r["loss_ce"] * 1.01} if "loss_ce" in r else {})
    with open(metrics, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    shutil.rmtree(new.run_dir(*runs[0]))  # its adoption (links to the altered file), so one candidate is left
    newer = engine.Plan(dataclasses.replace(new.study, run_code=(*new.study.run_code, "Makefile")), 4, 5, 2)
    assert newer.pretrain_key == new.pretrain_key
    capsys.readouterr()
    again = newer.run_many(runs[:1])
    text = capsys.readouterr().out
    assert "lora_backbone: not adopting" in text and "iteration 4: loss_ce" in text
    assert "adopted" not in again[0] and again[0]["AP"] == old_runs[0]["AP"]


def test_the_page_says_what_was_adopted():
    from peft_d2.study import report

    runs = [{"method": "m"}, {"method": "m", "adopted": {"from": "x"}}]
    assert report.adopted_text({"base": {}, "selection": runs[:1], "runs": runs[:1]}) == ""
    text = report.adopted_text({"base": {"adopted": {}}, "selection": runs, "runs": runs[1:]})
    assert text.startswith("; the base and 2 of 3 runs made by older code, adopted after") and "adopt.py" in text


def test_check_names_the_first_difference(tmp_path):
    def folder(name, config="SEED: 0\n", loss=1.25, ap=12.5):
        d = tmp_path / name
        d.mkdir()
        (d / "config.yaml").write_text(config)
        _metrics(d / "metrics.json", [{"iteration": 19, **dict(LOSSES, loss_ce=loss)}])
        (d / "result.json").write_text(json.dumps({"AP": ap, "AP50": 30.0}))
        return str(d)

    cached = folder("cached")
    record, why = adopt.check(folder("same"), cached)
    assert why is None and record["replayed_iterations"] == 20 and record["largest_difference"] == 0.0
    assert record["from"] == os.path.realpath(cached) and record["AP"] == 12.5
    assert adopt.check(folder("seed", config="SEED: 1\n"), cached) == (None, "SEED: 1 now, 0 in the cached run")
    assert "loss_ce" in adopt.check(folder("loss", loss=1.3), cached)[1]
    why = adopt.check(folder("ap", ap=12.4), cached)[1]
    assert why == "its weights evaluate to AP 12.4000 now, 12.5000 when it was made"


def test_the_operator_backend_is_part_of_every_key(monkeypatch):
    """A clone without the compiled operator runs the reference, whose numbers differ in the last bits: its base
    and runs get keys of their own (and the page says which operator ran)."""
    study = dataclasses.replace(studies.synthetic(smoke=True), prepare=lambda: "/nowhere")
    keys = {}
    for backend in ("cpu", "reference"):
        monkeypatch.setattr(engine, "operator_backend", lambda b=backend: b)
        plan = engine.Plan(study, 4, 5)
        keys[backend] = (plan.pretrain_key, plan.run_dir("lora_backbone", 0, 1.0, "val"))
    assert keys["cpu"][0] != keys["reference"][0] and keys["cpu"][1] != keys["reference"][1]
    monkeypatch.undo()
    monkeypatch.setenv(ENV_VAR, "reference")  # what a clone without the build runs
    assert engine.operator_backend() == "reference"
