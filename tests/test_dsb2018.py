"""The 2018 Data Science Bowl preparation (datasets/prepare_dsb2018.py) on a small fabricated sample in the
official layout: imaging kinds, splits, evaluation tiles, registration, bad inputs, and a 2-iteration training
and evaluation on it."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("detectron2")

from _models import load_tool  # noqa: E402

from peft_d2.data.checks import MalformedAnnotationError  # noqa: E402
from peft_d2.data.dsb2018 import image_kind, prepare_dsb2018, split_ids, tile_origins  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

ROOT = Path(__file__).resolve().parents[1]
TILE = 64


def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _image(kind, shape, masks, rng):
    fg = np.any(masks, axis=0) if masks else np.zeros(shape, bool)
    if kind == "fluorescence":  # grey, dark background, bright nuclei
        grey = np.where(fg, 200, 15) + rng.integers(0, 10, shape)
        rgb = np.repeat(grey[..., None], 3, -1)
    elif kind == "brightfield":  # grey, bright background, dark nuclei
        grey = np.where(fg, 60, 220) + rng.integers(0, 10, shape)
        rgb = np.repeat(grey[..., None], 3, -1)
    else:  # stained tissue: colour, bright background, purple nuclei
        rgb = np.where(fg[..., None], [110, 40, 150], [235, 200, 220]) + rng.integers(0, 10, (*shape, 3))
    alpha = np.full((*shape, 1), 255)
    return np.concatenate([rgb, alpha], -1).astype(np.uint8)  # RGBA, as the official images


def _write_sample(root, sid, kind, shape, discs, rng, mask_values=(0, 255)):
    d = root / "stage1_train" / sid
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    masks = [_disc(shape, *c) for c in discs]
    Image.fromarray(_image(kind, shape, masks, rng)).save(d / "images" / f"{sid}.png")
    for k, m in enumerate(masks):
        Image.fromarray(np.where(m, mask_values[1], mask_values[0]).astype(np.uint8)).save(d / "masks" / f"m{k}.png")
    return d


def fabricate(root: Path, n=(8, 6, 3), shapes=((96, 130), (64, 80), (128, 128))) -> Path:
    """n[i] images of fluorescence, tissue and brightfield, each with nuclei on a grid (one cut by the border)."""
    rng = np.random.default_rng(0)
    for kind, count, shape in zip(("fluorescence", "tissue", "brightfield"), n, shapes, strict=True):
        for i in range(count):
            discs = [(12 + 20 * (j // 3), 14 + 22 * (j % 3), 5 + (i + j) % 3) for j in range(3 + i % 3)]
            discs.append((shape[0] - 2, shape[1] // 2, 6))  # cut by the bottom border
            _write_sample(root, f"{kind[:3]}{i:03d}", kind, shape, discs, rng)
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    src = fabricate(tmp_path_factory.mktemp("dsb_src"))
    d2 = tmp_path_factory.mktemp("d2datasets")
    summary = prepare_dsb2018(str(src), str(d2 / "dsb2018"), fewshot=2, tile=TILE, log=lambda *_: None)
    return src, d2, summary


def test_kinds_are_computed_from_the_images(prepared):
    _, _, summary = prepared
    kinds = {s: v["kind"] for s, v in summary["images"].items()}
    assert kinds == {s: {"flu": "fluorescence", "tis": "tissue", "bri": "brightfield"}[s[:3]] for s in kinds}
    assert list(summary["kinds"]) == ["fluorescence", "tissue", "brightfield"]


def test_image_kind_rule_thresholds():
    grey = np.full((8, 8, 3), 20, np.uint8)
    assert image_kind(grey)[0] == "fluorescence"
    assert image_kind(grey + 200)[0] == "brightfield"
    tint = grey.copy()
    tint[..., 2] += 6  # chroma 2.67: colour
    assert image_kind(tint)[0] == "tissue"
    assert image_kind(tint)[1]["chroma"] == pytest.approx(8 / 3, abs=1e-3)


def test_splits_are_deterministic_disjoint_and_documented_sizes():
    ids = [f"id{i}" for i in range(40)]
    s = split_ids(ids, fewshot=8)
    assert s == split_ids(list(reversed(ids)), fewshot=8)  # order of listing does not matter
    assert len(s["val"]) == 6 and len(s["fewshot"]) == 8 and len(s["test"]) == 26
    assert set(s["train"]) == set(ids) - set(s["val"])
    assert set(s["fewshot"]) | set(s["test"]) == set(s["train"])
    assert not set(s["fewshot"]) & set(s["test"]) and not set(s["val"]) & set(s["train"])
    assert len(split_ids(["a"], fewshot=8)["val"]) == 1


def test_split_files_match_the_summary(prepared):
    _, d2, summary = prepared
    flu = summary["kinds"]["fluorescence"]
    assert flu["val"]["images"] == 1 and flu["fewshot"]["images"] == 2 and flu["test"]["images"] == 5
    assert flu["train"]["images"] == 7
    data = json.load(open(d2 / "dsb2018" / "annotations" / "fluorescence_train.json"))
    assert len(data["images"]) == 7 and data["categories"] == [{"id": 1, "name": "nucleus"}]
    assert all(a["iscrowd"] == 0 and isinstance(a["segmentation"]["counts"], str) for a in data["annotations"])


def test_tile_origins_cover_every_pixel_with_full_tiles():
    assert tile_origins(256, 128) == [0, 128]
    assert tile_origins(320, 128) == [0, 128, 192]
    assert tile_origins(100, 128) == [0]
    for size in (129, 520, 696):
        starts = tile_origins(size, 128)
        covered = np.zeros(size, bool)
        for s in starts:
            assert 0 <= s and s + 128 <= size
            covered[s : s + 128] = True
        assert covered.all()


def test_tiles_keep_nuclei_at_least_half_inside_and_ignore_the_rest(tmp_path):
    shape = (64, 128)  # two tiles of 64: x = 0 and x = 64
    discs = [(32, 60, 8), (32, 20, 5), (32, 66, 8)]  # centred at 60: 7/17 columns inside the right tile
    _write_sample(tmp_path, "one", "fluorescence", shape, discs, np.random.default_rng(0))
    out = tmp_path / "out"
    prepare_dsb2018(str(tmp_path), str(out), fewshot=0, tile=64, log=lambda *_: None)
    tiles = json.load(open(out / "annotations" / "fluorescence_val_tiles64.json"))
    assert [(im["x"], im["y"]) for im in tiles["images"]] == [(0, 0), (64, 0)]
    masks = [_disc(shape, *c) for c in discs]
    expected = []
    for tile_id, x in ((1, 0), (2, 64)):
        for m in masks:
            inside = m[:, x : x + 64].sum()
            if inside:
                expected.append((tile_id, int(inside), int(inside < 0.5 * m.sum())))
    got = [(a["image_id"], a["area"], a["iscrowd"]) for a in tiles["annotations"]]
    assert got == expected
    assert {c for _, _, c in got} == {0, 1}  # the fixture has both a kept and an ignored border-cut nucleus
    tile_img = np.asarray(Image.open(out / "tiles64" / "one_0_64.png"))
    whole = np.asarray(Image.open(out / "images" / "one.png"))
    assert tile_img.shape == (64, 64, 3) and np.array_equal(tile_img, whole[:, 64:])


def _bad(tmp_path, mutate):
    src = tmp_path / "src"
    d = _write_sample(src, "bad", "fluorescence", (40, 40), [(20, 20, 6), (8, 8, 4)], np.random.default_rng(0))
    mutate(d)
    out = tmp_path / "out"
    with pytest.raises(MalformedAnnotationError) as e:
        prepare_dsb2018(str(src), str(out), log=lambda *_: None)
    assert not out.exists(), "a failed preparation must not leave a half-written output"
    return str(e.value)


def test_missing_masks_folder_is_named(tmp_path):
    msg = _bad(tmp_path, lambda d: shutil.rmtree(d / "masks"))
    assert "masks" in msg and "bad" in msg and "stage1_train/<id>/masks" in msg


def test_missing_images_folder_is_named(tmp_path):
    msg = _bad(tmp_path, lambda d: shutil.rmtree(d / "images"))
    assert str(Path("bad") / "images") in msg


def test_non_binary_mask_is_an_error_naming_the_file(tmp_path):
    def grey_mask(d):
        Image.fromarray(np.arange(1600, dtype=np.uint8).reshape(40, 40) % 7).save(d / "masks" / "m1.png")

    msg = _bad(tmp_path, grey_mask)
    assert "m1.png" in msg and "not binary" in msg


def test_wrongly_sized_mask_is_an_error_naming_the_file(tmp_path):
    msg = _bad(tmp_path, lambda d: Image.fromarray(np.zeros((30, 40), np.uint8)).save(d / "masks" / "m0.png"))
    assert "m0.png" in msg and "30x40" in msg and "40x40" in msg


def test_rgb_mask_is_an_error_naming_the_file(tmp_path):
    msg = _bad(tmp_path, lambda d: Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(d / "masks" / "m0.png"))
    assert "m0.png" in msg and "2-D" in msg


def test_not_the_official_layout(tmp_path):
    with pytest.raises(MalformedAnnotationError, match="stage1_train"):
        prepare_dsb2018(str(tmp_path), str(tmp_path / "out"), log=lambda *_: None)


def test_empty_masks_are_skipped_and_overlaps_kept(tmp_path):
    src = tmp_path / "src"
    d = _write_sample(src, "ovl", "fluorescence", (40, 40), [(20, 20, 6), (20, 24, 6)], np.random.default_rng(0))
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(d / "masks" / "zero.png")
    Image.fromarray(np.where(_disc((40, 40), 8, 8, 3), 1, 0).astype(np.uint8)).save(d / "masks" / "ones.png")
    summary = prepare_dsb2018(str(src), str(tmp_path / "out"), log=lambda *_: None)
    assert summary["skipped_empty_masks"] == 1
    overlap = (_disc((40, 40), 20, 20, 6) & _disc((40, 40), 20, 24, 6)).sum()
    assert summary["overlap_pixels"] == overlap > 0
    data = json.load(open(tmp_path / "out" / "annotations" / "fluorescence_train.json"))
    assert data["annotations"] == []  # one image: it is the val split
    data = json.load(open(tmp_path / "out" / "annotations" / "fluorescence_val.json"))
    assert len(data["annotations"]) == 3  # two overlapping discs and the {0, 1} mask


def test_prepare_script_reports_bad_input(tmp_path, capsys):
    prepare = load_tool("../datasets/prepare_dsb2018.py", "peft_d2_prepare_dsb2018")
    assert prepare.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "stage1_train" in capsys.readouterr().err


def test_registration_loads_every_split(prepared, monkeypatch):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from peft_d2.data import register_all_datasets

    _, d2, summary = prepared
    monkeypatch.setenv("DETECTRON2_DATASETS", str(d2))
    names = register_all_datasets()
    for kind, splits in summary["kinds"].items():
        for split, entry in splits.items():
            dicts = DatasetCatalog.get(f"dsb2018_{kind}_{split}")
            assert len(dicts) == entry["images"] and all(os.path.isfile(d["file_name"]) for d in dicts)
            if "tiles" in entry:
                tiles = DatasetCatalog.get(f"dsb2018_{kind}_{split}_tiles")
                assert len(tiles) == entry["tiles"]
                assert all((d["height"], d["width"]) == (TILE, TILE) for d in tiles)
                crowd = sum(a["iscrowd"] for d in tiles for a in d["annotations"])
                assert crowd == entry["tile_ignored"]
    meta = MetadataCatalog.get("dsb2018_tissue_test_tiles")
    assert meta.thing_classes == ["nucleus"] and meta.tile == TILE and meta.evaluator_type == "coco"
    assert "dsb2018_brightfield_fewshot" in names
    monkeypatch.setenv("DETECTRON2_DATASETS", str(d2 / "nowhere"))
    register_all_datasets()
    with pytest.raises(FileNotFoundError, match="prepare_dsb2018"):
        DatasetCatalog.get("dsb2018_tissue_val")
    monkeypatch.undo()
    register_all_datasets()


@pytest.mark.slow
def test_two_iterations_train_and_evaluate_on_tiles(prepared, tmp_path, monkeypatch):
    _, d2, _ = prepared
    monkeypatch.setenv("DETECTRON2_DATASETS", str(d2))
    train_net = load_tool()
    config = str(ROOT / "configs" / "dsb2018" / "maskformer2_swin_dsb2018_micro.yaml")
    argv = [
        "--config-file",
        config,
        "--num-gpus",
        "1",
        "OUTPUT_DIR",
        str(tmp_path),
        "SOLVER.MAX_ITER",
        "2",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "INPUT.CROP.SIZE",
        f"({TILE}, {TILE})",
        "DATALOADER.NUM_WORKERS",
        "0",
        "TEST.EVAL_PERIOD",
        "0",
        "SOLVER.WARMUP_ITERS",
        "1",
    ]
    results = train_net.main(train_net.default_argument_parser().parse_args(argv))
    segm = results["segm"]
    assert math.isfinite(segm["AP"]) and 0.0 <= segm["AP"] <= 100.0
    preds = json.load(open(tmp_path / "inference" / "coco_instances_results.json"))
    per_image = np.bincount([p["image_id"] for p in preds])
    assert per_image.max() <= 50  # TEST.DETECTIONS_PER_IMAGE
    monkeypatch.undo()


def _cfg(*opts):
    from peft_d2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(str(ROOT / "configs" / "dsb2018" / "maskformer2_swin_dsb2018_micro.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def test_coco_evaluation_counts_detections_per_image(prepared, monkeypatch, tmp_path):
    _, d2, _ = prepared
    monkeypatch.setenv("DETECTRON2_DATASETS", str(d2))
    from peft_d2.data import register_all_datasets

    register_all_datasets()
    train_net = load_tool()
    ev = train_net.build_evaluators(
        _cfg("TEST.DETECTIONS_PER_IMAGE", 150), "dsb2018_fluorescence_val_tiles", str(tmp_path)
    )
    assert ev._max_dets_per_image == [1, 10, 150]  # COCO's default would count only the first 100
    monkeypatch.undo()
    register_all_datasets()


def test_query_count_capping_detections_is_said():
    import logging

    from detectron2.modeling import build_model

    # a handler of its own: train_net's setup_logger may have stopped peft_d2's records from reaching caplog
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("peft_d2.modeling.meta_arch.maskformer")
    logger.addHandler(handler)
    try:
        build_model(_cfg("TEST.DETECTIONS_PER_IMAGE", 100))
        assert any("at most" in r.getMessage() and "50 x 1 = 50" in r.getMessage() for r in records)
        records.clear()
        build_model(_cfg("TEST.DETECTIONS_PER_IMAGE", 50))
        assert not records
    finally:
        logger.removeHandler(handler)


@pytest.mark.slow
def test_the_study_runs_on_the_nuclei_at_toy_size(tmp_path, monkeypatch):
    """tools/benchmark_peft.py --study dsb2018 on the fabricated sample: preparation (cached), pretraining on
    fluorescence, the learning-rate selection on tissue val tiles, the runs on tissue test tiles, the page."""
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    import benchmark_peft

    src = fabricate(tmp_path / "src")
    monkeypatch.setenv("PEFT_D2_HOME", str(tmp_path / "home"))
    prefix = str(tmp_path / "bench")
    argv = ["--study", "dsb2018", "--data", str(src), "--smoke", "--pretrain-iters", "2", "--finetune-iters", "2",
            "--seeds", "0", "1", "--methods", "full_finetune", "lora_backbone", "--lr-scales", "1",
            "--max-extensions", "0", "--output", prefix]
    raw = benchmark_peft.main(argv)
    assert raw["study"]["name"] == "dsb2018" and raw["study"]["target"] == "tissue"
    assert {r["dataset"] for r in raw["selection"]} == {"dsb2018_tissue_val_tiles"}
    assert {r["dataset"] for r in raw["runs"]} == {"dsb2018_tissue_test_tiles"}
    page = Path(prefix + ".md").read_text()
    assert page.startswith("# DSB 2018 nuclei transfer benchmark (fluorescence -> tissue)")
    assert "## Results on tissue test" in page and "on fluorescence val (" in page
    # what each part took, measured by the engine, and the pictures drawn from the cached models
    assert all(r["wall_s"] > 0 for r in [raw["base"], *raw["selection"], *raw["runs"]])
    assert "in all: the base's pretraining" in page and "6 fine-tuning runs" in page
    for png in ("_predictions.png", "_base_fluorescence_val.png"):
        assert Image.open(prefix + png).size[0] > 0
    with pytest.raises(SystemExit):
        benchmark_peft.main(["--study", "dsb2018", "--data", str(src), "--source", "purple"])
    with pytest.raises(SystemExit):
        benchmark_peft.main(["--study", "dsb2018"])  # no --data


def test_each_study_reports_over_its_own_seeds(tmp_path, monkeypatch):
    """benchmark_peft's default seeds are the study's: 5 for the synthetic study, 15 for the nuclei (whose first
    run's 5 left full fine-tuning's interval too wide for the power check)."""
    from peft_d2.study import studies

    monkeypatch.setenv("PEFT_D2_HOME", str(tmp_path / "home"))
    assert studies.synthetic().seeds == (0, 1, 2, 3, 4)
    assert studies.dsb2018(str(fabricate(tmp_path / "src")), fewshot=2).seeds == tuple(range(15))
