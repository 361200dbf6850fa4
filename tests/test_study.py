"""The studies' statistics and decision rules (peft_d2/study/rules.py), the engine's learning-rate rule, the page
(peft_d2/study/report.py), and one end-to-end run of the benchmark and the demo at toy size."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

from peft_d2 import study
from peft_d2.study import engine, report, studies

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

SEEDS = (0, 1, 2, 3, 4)
NOISE = (0.3, -0.2, 0.1, -0.4, 0.2)  # per-seed noise shared by all methods: the paired design cancels it


def _ap(mean, noise=NOISE, jitter=(0, 0, 0, 0, 0)):
    return {s: mean + n + j for s, n, j in zip(SEEDS, noise, jitter)}


def test_interval_is_the_student_t_interval():
    x = study.interval([1.0, 2.0, 3.0])
    assert x.mean == 2.0 and x.n == 3
    assert x.half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)  # t(0.975, 2) * sd / sqrt(n), sd = 1
    assert (x.low, x.high) == pytest.approx((2.0 - x.half, 2.0 + x.half))
    assert math.isnan(study.interval([5.0]).half)
    with pytest.raises(ValueError):
        study.interval([])


def test_paired_uses_common_seeds_and_cancels_shared_noise():
    a = {0: 10.0, 1: 20.0, 2: 30.0, 7: 99.0}
    b = {0: 9.0, 1: 19.0, 2: 29.0}
    d = study.paired(a, b)
    assert d.n == 3 and d.mean == pytest.approx(1.0) and d.half == pytest.approx(0.0)
    with pytest.raises(ValueError, match="no common seed"):
        study.paired({0: 1.0}, {1: 1.0})


TOTAL = 1_000_000
TRAINABLE = {"scratch": TOTAL, "full_finetune": TOTAL, "baseline_heads_only": 3_000, "lora_backbone": 20_000,
             "lora_msdeformattn": 5_000, "adapters_1": 6_000, "adapters_2": 9_000, "adapters_3": 12_000,
             "adapters_parallel": 19_000, "prefix": 12_000, "mopeft": 70_000, "cobot_lora": 20_300,
             "cobot_adapter": 19_600, "sfa": 17_000}


def _study(**means):
    base = {"scratch": 10, "full_finetune": 50, "baseline_heads_only": 30, "lora_backbone": 46, "lora_msdeformattn": 40,
            "adapters_1": 40, "adapters_2": 40, "adapters_3": 40, "adapters_parallel": 44, "prefix": 38, "mopeft": 46,
            "cobot_lora": 46, "cobot_adapter": 44, "sfa": 47}
    base.update(means)
    return {m: _ap(v) for m, v in base.items()}


def test_verdicts_supported():
    ap = _study(adapters_2=43, lora_msdeformattn=42, cobot_lora=48, sfa=47.5, lora_backbone=46)
    v = study.verdicts(ap, TRAINABLE, TOTAL)
    assert v["peft_90"].verdict == "supported"  # lora_backbone 46 > 0.9 * 50
    assert v["adapters_23"].verdict == "supported"
    assert v["lora_msda"].verdict == "supported"  # fewer parameters than 1 adapter, +2 over adapters_1/3
    assert v["mopeft"].verdict == "supported"  # equal to its best single (lora_backbone): within the margin
    assert v["cobot"].verdict == "supported"
    # SFA (17,000) against every method training no more: heads, lora_msda, adapters_1/2/3, prefix
    assert v["sfa"].verdict == "supported"
    assert "vs adapters_3" in v["sfa"].evidence and "vs lora_backbone" not in v["sfa"].evidence


def test_verdicts_refuted():
    ap = _study(lora_backbone=30, lora_msdeformattn=30, adapters_1=40, adapters_2=35, adapters_3=34, prefix=30,
                adapters_parallel=30, mopeft=38, cobot_lora=28, cobot_adapter=29, sfa=30, baseline_heads_only=31)
    v = study.verdicts(ap, TRAINABLE, TOTAL)
    assert {k: x.verdict for k, x in v.items()} == {k: "refuted" for k in study.CLAIMS}


def test_verdicts_inconclusive_when_the_noise_is_not_shared():
    spread = (3.0, -3.0, 2.0, -2.0, 0.0)
    ap = _study()
    for m in ap:
        if m not in ("full_finetune", "adapters_1"):
            ap[m] = _ap({"lora_backbone": 45, "adapters_2": 40, "adapters_3": 40}.get(m, 40), jitter=spread)
    v = study.verdicts(ap, TRAINABLE, TOTAL)
    assert v["peft_90"].verdict == "inconclusive"
    assert v["adapters_23"].verdict == "inconclusive"


def test_lora_msda_with_more_parameters_than_an_adapter_is_refuted():
    trainable = dict(TRAINABLE, lora_msdeformattn=7_000)
    v = study.verdicts(_study(lora_msdeformattn=45), trainable, TOTAL)
    assert v["lora_msda"].verdict == "refuted"


def test_missing_methods_are_not_run():
    v = study.verdicts({"full_finetune": _ap(50), "scratch": _ap(10)}, TRAINABLE, TOTAL)
    assert {x.verdict for x in v.values()} == {"not run"}


def test_checks():
    names = [(n, ok) for n, ok, _ in study.checks(_study())]
    assert [ok for _, ok in names] == [True, True, True]
    flat = {"full_finetune": _ap(50, jitter=(5, -5, 4, -4, 0)), "scratch": _ap(49), "baseline_heads_only": _ap(50)}
    assert [ok for _, ok, _ in study.checks(flat)] == [False, False, False]


def _raw(tmp_path):
    runs = [{"method": m, "seed": s, "lr_scale": 1.0, "split": "test", "AP": v, "AP50": v + 10,
             "trainable": TRAINABLE[m], "total": TOTAL, "percent": 100 * TRAINABLE[m] / TOTAL, "step_s": 0.1,
             "iterations": 300, "peak_rss_mib": 900.0, "checkpoint_mib": 0.1, "curve": []}
            for m, aps in _study().items() for s, v in aps.items()]
    selection = [{"method": m, "seed": 100, "lr_scale": sc, "split": "val", "AP": ap}
                 for m in TRAINABLE for sc, ap in ((0.3, 20.0), (1.0, 30.0), (3.0, 30.0))]
    return {"command": "python tools/benchmark_peft.py", "date": "2026-11-22", "commit": "abc", "machine": "test",
            "duration_min": 1.0, "data": {"num_val": {"A": 100, "B": 50}, "num_test": {"B": 200}},
            "base": {"AP": 60.0, "iterations": 10, "curve": [{"iteration": 10, "AP": 60.0}]},
            "methods": list(TRAINABLE), "seeds": list(SEEDS), "selection_seed": 100, "lr_scales": [0.3, 1.0, 3.0],
            "selected_lr_scale": {m: 1.0 for m in TRAINABLE}, "selection": selection, "runs": runs}


def test_learning_rate_rule_picks_the_best_val_ap_and_the_smaller_scale_on_ties():
    runs = [{"method": "a", "lr_scale": 3.0, "AP": 30.0}, {"method": "a", "lr_scale": 1.0, "AP": 30.0},
            {"method": "a", "lr_scale": 0.3, "AP": 29.0}, {"method": "b", "lr_scale": 0.3, "AP": 10.0},
            {"method": "b", "lr_scale": 3.0, "AP": 11.0}]
    assert engine.choose(runs) == {"a": 1.0, "b": 3.0}


def test_learning_rate_search_steps_beyond_the_edge_it_chose():
    def runs(method, aps):
        return [{"method": method, "lr_scale": s, "AP": ap} for s, ap in aps]

    sel = (runs("up", ((0.3, 1.0), (1.0, 2.0), (3.0, 3.0))) + runs("down", ((0.3, 3.0), (1.0, 2.0), (3.0, 1.0)))
           + runs("inside", ((0.3, 1.0), (1.0, 3.0), (3.0, 1.0))) + runs("ladder_end", ((10.0, 1.0), (30.0, 3.0))))
    assert engine.extensions(sel) == {"up": 10.0, "down": 0.1}


def test_learning_rate_search_finds_an_optimum_beyond_the_starting_grid():
    """A fake plan whose B val AP peaks at x10: the search steps to 10, then to 30, and stops with 10 inside."""
    import math

    class Plan:
        calls = []

        def run_many(self, runs):
            self.calls.append(runs)
            return [{"method": m, "seed": seed, "lr_scale": s, "split": split, "AP": 50 - math.log(s / 10) ** 2}
                    for m, seed, s, split in runs]

    plan = Plan()
    sel = engine.select(plan, ["m"], [0.3, 1.0, 3.0], max_extensions=2)
    assert [r["lr_scale"] for r in sel] == [0.3, 1.0, 3.0, 10.0, 30.0]
    assert {r["split"] for r in sel} == {"val"} and {r["seed"] for r in sel} == {engine.SELECTION_SEED}
    assert engine.choose(sel) == {"m": 10.0} and len(plan.calls) == 3
    raw = {"selection": sel, "runs": [], "selected_lr_scale": {"m": 10.0}}
    assert report.edge_note(raw).startswith("Every chosen scale lies inside")
    capped = engine.select(Plan(), ["m"], [0.3, 1.0, 3.0], max_extensions=0)
    raw = {"selection": capped, "runs": [{**capped[0], "diverged": True}], "selected_lr_scale": {"m": 3.0}}
    note = report.edge_note(raw)
    assert "edge of the range searched" in note and "m (x3)" in note and "Diverged" in note


def test_page_is_generated_from_the_raw_results(tmp_path):
    import benchmark_peft

    prefix = str(tmp_path / "bench")
    Path(prefix + ".json").write_text(json.dumps(_raw(tmp_path)))
    benchmark_peft.main(["--report-only", "--output", prefix])
    page = Path(prefix + ".md").read_text()
    assert "do not edit by hand" in page and (tmp_path / "bench.png").stat().st_size > 0
    for v in study.verdicts(_study(), TRAINABLE, TOTAL).values():
        assert f"| {v.claim} | **{v.verdict}** |" in page
    assert "| full_finetune | 20.0 | 30.0 | 30.0 | 1 |" in page  # the selection table
    assert "**pass**: the base matters" in page


@pytest.mark.parametrize("folder", ["configs/synthetic/demo", "configs/synthetic/peft", "configs/dsb2018/peft"])
def test_every_method_of_a_study_has_its_config(folder):
    """A study runs every name in studies.METHODS from <method>.yaml of its folder ("scratch": full fine-tuning's)."""
    root = Path(__file__).resolve().parents[1] / folder
    missing = [m for m in studies.METHODS if not (root / f"{'full_finetune' if m == 'scratch' else m}.yaml").is_file()]
    assert not missing, f"{folder} lacks configs for {missing} (tools/make_peft_configs.py writes them)"


def test_bad_arguments_are_refused():
    import benchmark_peft
    import demo

    with pytest.raises(SystemExit):
        demo.parse_args(["--methods", "nonsense"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--seeds", "1", "1"])
    with pytest.raises(SystemExit):
        benchmark_peft.main(["--seeds", "0", str(engine.SELECTION_SEED)])


@pytest.mark.slow
def test_benchmark_then_demo_end_to_end_at_toy_size(tmp_path, monkeypatch, capsys):
    """The whole pipeline on toy data: pretraining (cached), the learning-rate selection on B val, the test
    runs, the page; then the demo reuses every cached stage and writes its table, plot and predictions."""
    import benchmark_peft
    import demo

    monkeypatch.setenv("PEFT_D2_HOME", str(tmp_path / "home"))
    common = ["--smoke", "--pretrain-iters", "4", "--finetune-iters", "5", "--seeds", "0", "1"]
    methods = ["--methods", "scratch", "full_finetune", "lora_backbone"]  # scratch: the config of another method
    prefix = str(tmp_path / "bench")
    raw = benchmark_peft.main([*common, *methods, "--lr-scales", "1", "3", "--max-extensions", "0",
                               "--output", prefix])
    assert len(raw["selection"]) == 6 and len(raw["runs"]) == 6
    assert {r["split"] for r in raw["selection"]} == {"val"} and {r["split"] for r in raw["runs"]} == {"test"}
    assert raw["selected_lr_scale"] == engine.choose(raw["selection"])
    for r in raw["runs"]:
        assert r["lr_scale"] == raw["selected_lr_scale"][r["method"]]
    lora = next(r for r in raw["runs"] if r["method"] == "lora_backbone")
    full = next(r for r in raw["runs"] if r["method"] == "full_finetune")
    assert lora["trainable"] < full["trainable"] == full["total"] and lora["checkpoint_mib"] < full["checkpoint_mib"]
    assert Path(prefix + ".md").exists() and Path(prefix + ".png").exists()
    runs_dir = next((tmp_path / "home" / "synthetic").glob("runs-*"))
    before = sorted(os.listdir(runs_dir))

    out = tmp_path / "demo"
    capsys.readouterr()
    res = demo.main([*common, *methods, "--lr-scales-from", prefix + ".json", "--output", str(out)])
    text = capsys.readouterr().out
    assert sorted(os.listdir(runs_dir)) == before  # every run came from the cache
    assert "6 of 6 runs cached" in text and "AP - full (paired 95% CI)" in text
    assert {r["method"] for r in res["rows"]} == {"scratch", "full_finetune", "lora_backbone"}
    for name in ("results.json", "results.md", "ap_vs_params.png", "predictions.png", "base_A_val.png"):
        assert (out / name).stat().st_size > 0
    # the last step: one method here, so its two seeds' adapter files are served from one base in one batch
    served = res["served"]
    assert served["adapters"] == ["lora_backbone (seed 0)", "lora_backbone (seed 1)"] and served["images"] == 4
    assert served["equal"] and served["mask_pixels"] > 0 and "predictions equal each file's own model" in text
    assert served["adapters_apart"] > 1e-3  # the two files predict differently: a mix-up would be seen


def test_progress_line_waits_for_the_first_logged_iteration(tmp_path):
    """The pretraining progress line reads the run's metrics.json, which exists (empty) before the first
    iteration is logged: that is no error, and once a row is there the line shows it."""
    (tmp_path / "spec.json").write_text(json.dumps({"config": "configs/x.yaml"}))
    (tmp_path / "max_iter.json").write_text(json.dumps({"max_iter": 100}))
    (tmp_path / "metrics.json").write_text("")
    assert engine.iteration_text("pretraining", str(tmp_path)) is None
    (tmp_path / "metrics.json").write_text(json.dumps({"iteration": 19, "time": 0.5}) + "\n")
    assert "iteration 20/100, ETA 0.7 min (" in engine.iteration_text("pretraining", str(tmp_path))


def test_wall_clock_continues_over_resumptions(tmp_path):
    """A resumed run's wall time adds to what its earlier segments took (kept on disk), and starts from 0 when
    nothing was kept."""
    path = tmp_path / "wall_s.json"
    first = engine.WallClock(str(path), period=0.0)
    assert 0.0 <= first.tick() < 5.0 and json.loads(path.read_text())["wall_s"] < 5.0
    path.write_text(json.dumps({"wall_s": 600.0}))  # as a killed run's segments would have left it
    resumed = engine.WallClock(str(path), period=3600.0)
    assert 600.0 <= resumed.tick() < 605.0
    assert json.loads(path.read_text())["wall_s"] == 600.0  # not rewritten within the period
    assert resumed.tick(force=True) == json.loads(path.read_text())["wall_s"] >= 600.0


def test_progress_line_shows_each_evaluation_once(tmp_path):
    """A resumed run logs the evaluation at its checkpoint again: the line shows the last value, once."""
    (tmp_path / "spec.json").write_text(json.dumps({"config": "configs/x.yaml"}))
    (tmp_path / "max_iter.json").write_text(json.dumps({"max_iter": 3000}))
    rows = [{"iteration": 1499, "time": 0.5, "segm/AP": 9.0}, {"iteration": 1499, "segm/AP": 9.5},
            {"iteration": 1519, "time": 0.5}]  # fmt: skip
    (tmp_path / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = engine.iteration_text("pretraining", str(tmp_path))
    assert "iteration 1520/3000, ETA 12.3 min" in text and text.endswith("; val AP at 1500: 9.5"), text


def test_learning_curves_page_from_run_folders(tmp_path):
    """tools/learning_curves.py reads each run's settings and evaluations (a resumed run's repeated evaluation
    once), writes the raw JSON, and --report-only regenerates the same page from it; a folder that is not a
    training output gets an error naming it."""
    import yaml
    from _models import load_tool

    tool = load_tool("learning_curves.py", "peft_d2_learning_curves")
    run = tmp_path / "probe"
    run.mkdir()
    cfg = {"MODEL": {"SWIN": {"EMBED_DIM": 32, "DEPTHS": [1, 1, 1, 1]}, "MASK_FORMER": {"NUM_OBJECT_QUERIES": 50}},
           "SOLVER": {"BASE_LR": 0.001, "MAX_ITER": 3000, "STEPS": [2400]}}  # fmt: skip
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"iteration": 19, "time": 0.5}, {"iteration": 1499, "segm/AP": 9.0, "segm/AP50": 20.0},
            {"iteration": 1499, "segm/AP": 9.5, "segm/AP50": 22.5}, {"iteration": 2999, "segm/AP": 11.9,
            "segm/AP50": 27.5}]  # fmt: skip
    (run / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    prefix = str(tmp_path / "page")
    raw = tool.main(["--run", f"micro q50={run}", "--output", prefix])
    (r,) = raw["runs"]
    assert r["settings"]["backbone width"] == 32 and r["settings"]["queries"] == 50
    assert r["settings"]["lr drops at"] == [2400] and r["settings"]["batch"] is None  # absent from the file
    assert r["iterations_run"] == 3000 and r["median_step_s"] == 0.5
    assert r["curve"] == [{"iteration": 1500, "AP": 9.5, "AP50": 22.5}, {"iteration": 3000, "AP": 11.9, "AP50": 27.5}]
    page = Path(prefix + ".md").read_text()
    assert "**micro q50**: 1500: 9.5 (22.5), 3000: 11.9 (27.5)" in page and os.path.getsize(prefix + ".png") > 0
    os.remove(prefix + ".md")
    tool.main(["--report-only", "--output", prefix])
    assert Path(prefix + ".md").read_text() == page
    with pytest.raises(SystemExit, match="not a tools/train_net.py output folder"):
        tool.main(["--run", f"x={tmp_path / 'nothing'}", "--output", prefix])
    with pytest.raises(SystemExit):
        tool.main(["--run", "no-equals-sign", "--output", prefix])


@pytest.mark.parametrize(
    "page",
    ["benchmark_synthetic", "benchmark_dsb2018", "benchmark_dsb2018_5seeds", "dsb2018_recipes", "benchmark_export"],
)
def test_committed_pages_regenerate_from_their_raw_json(tmp_path, page):
    """docs/<page>.md is what its tool writes from docs/<page>.json: nothing was edited by hand, and the page code
    still reads every committed result."""
    import shutil

    import benchmark_peft
    from _models import load_tool

    prefix = str(tmp_path / page)
    shutil.copy(ROOT / "docs" / f"{page}.json", prefix + ".json")
    if page == "dsb2018_recipes":
        load_tool("learning_curves.py", "peft_d2_learning_curves").main(["--report-only", "--output", prefix])
    elif page == "benchmark_export":
        load_tool("benchmark_export.py", "peft_d2_benchmark_export").main(["--report-only", "--output", prefix])
    else:
        benchmark_peft.main(["--report-only", "--output", prefix])
    assert Path(prefix + ".md").read_text() == (ROOT / "docs" / f"{page}.md").read_text()


def test_page_names_the_operator_that_ran(tmp_path):
    raw = dict(_raw(tmp_path), operator="reference")
    prefix = str(tmp_path / "bench")
    text = report.write_page(raw, prefix)[0]
    page = Path(prefix + ".md").read_text()
    assert "machine: test (deformable attention: the PyTorch reference); duration" in page and text
