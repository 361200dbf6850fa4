"""MODEL.PEFT keys: defaults, conversion to PeftConfig, errors naming the key."""

import pytest
from detectron2.config import get_cfg

from peft_d2 import PeftConfigError
from peft_d2.config import add_peft_config, peft_config_from_cfg


def cfg_with(**overrides):
    cfg = add_peft_config(get_cfg())
    for k, v in overrides.items():
        cfg.merge_from_list([k, v])
    return cfg


def test_defaults_convert():
    pc = peft_config_from_cfg(cfg_with())
    assert pc.methods == () and pc.lora.r == 8 and pc.adapter.num_per_site == 1


def test_values_reach_the_config():
    cfg = cfg_with(**{"MODEL.PEFT.METHODS": ["lora", "adapter"], "MODEL.PEFT.LORA.RANK": 16,
                      "MODEL.PEFT.ADAPTER.NUM_PER_SITE": 3, "MODEL.PEFT.ADAPTER.PLACEMENTS": ["attn", "mlp"]})
    pc = peft_config_from_cfg(cfg)
    assert pc.methods == ("lora", "adapter") and pc.lora.r == 16 and pc.lora.scaling == 0.5
    assert pc.adapter.num_per_site == 3 and pc.adapter.placements == ("attn", "mlp")
    assert type(pc).from_dict(pc.to_dict()) == pc


@pytest.mark.parametrize(
    "key, value",
    [("MODEL.PEFT.LORA.RANK", 0), ("MODEL.PEFT.LORA.ALPHA", -1.0), ("MODEL.PEFT.LORA.DROPOUT", 1.5),
     ("MODEL.PEFT.ADAPTER.NUM_PER_SITE", 4), ("MODEL.PEFT.METHODS", ["lora", "prompt"])],
)
def test_bad_values_name_the_key(key, value):
    with pytest.raises(PeftConfigError, match=key.replace(".", r"\.")):
        peft_config_from_cfg(cfg_with(**{key: value}))


def test_a_misspelt_key_gets_the_closest_valid_keys(tmp_path):
    from peft_d2.config import get_cfg, merge_config

    with pytest.raises(PeftConfigError, match=r"^Non-existent config key MODEL.PEFT.LORA.RANKK on the command line "
                       r"\(KEY VALUE overrides\); closest valid keys: MODEL.PEFT.LORA.RANK, MODEL.PEFT.LORA.DORA, "
                       r"MODEL.PEFT.LORA.RSLORA$"):
        merge_config(get_cfg(), opts=["MODEL.PEFT.LORA.RANKK", "4"])
    (tmp_path / "base.yaml").write_text("SOLVER:\n  MAXITER: 10\n")
    (tmp_path / "child.yaml").write_text("_BASE_: base.yaml\n")
    with pytest.raises(PeftConfigError, match=rf"^Non-existent config key SOLVER.MAXITER in {tmp_path}/child.yaml \(or "
                       r"a file of its _BASE_ chain\); closest valid keys: SOLVER.MAX_ITER, "):
        merge_config(get_cfg(), str(tmp_path / "child.yaml"))
    (tmp_path / "node.yaml").write_text("MODEL:\n  PEFTT:\n    LORA:\n      RANK: 4\n")
    with pytest.raises(PeftConfigError, match=r"key MODEL.PEFTT in .*node.yaml .*; closest valid keys: MODEL.PEFT,"):
        merge_config(get_cfg(), str(tmp_path / "node.yaml"))  # yacs names the node: keys of its depth
    with pytest.raises(PeftConfigError, match=r"config key FOO on the command line \(KEY VALUE overrides\); the "
                       r"config's top-level keys are: VERSION, MODEL, INPUT, "):  # nothing close
        merge_config(get_cfg(), opts=["FOO", "1"])
    (tmp_path / "ok.yaml").write_text("SOLVER:\n  MAX_ITER: 10\n")
    cfg = merge_config(get_cfg(), str(tmp_path / "ok.yaml"), ["SOLVER.BASE_LR", "0.5"])
    assert cfg.SOLVER.MAX_ITER == 10 and cfg.SOLVER.BASE_LR == 0.5


ZOO_MASK_RCNN = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"


def test_a_base_may_be_a_model_zoo_config(tmp_path):
    """`_BASE_: model_zoo://NAME` is detectron2's model-zoo config NAME with its own _BASE_ chain (Base-RCNN-FPN.yaml),
    the same keys detectron2's merge_from_file gives for the zoo file, under the files that name it."""
    from detectron2 import model_zoo

    from peft_d2.config import get_cfg, merge_config

    (tmp_path / "base.yaml").write_text(f'_BASE_: "model_zoo://{ZOO_MASK_RCNN}"\nSOLVER:\n  MAX_ITER: 7\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("_BASE_: [../base.yaml]\nMODEL:\n  ROI_HEADS:\n    NUM_CLASSES: 3\n")
    cfg = merge_config(get_cfg(), str(tmp_path / "sub" / "child.yaml"), ["SOLVER.BASE_LR", "0.01"])
    expected = get_cfg()
    expected.merge_from_file(model_zoo.get_config_file(ZOO_MASK_RCNN))
    expected.merge_from_list(["SOLVER.MAX_ITER", 7, "MODEL.ROI_HEADS.NUM_CLASSES", 3, "SOLVER.BASE_LR", 0.01])
    assert cfg == expected
    assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.MODEL.MASK_ON and cfg.SOLVER.STEPS == (210000, 250000)  # the 3x file
    assert cfg.MODEL.BACKBONE.NAME == "build_resnet_fpn_backbone" and cfg.SOLVER.IMS_PER_BATCH == 16  # its base's
    assert cfg.SOLVER.MAX_ITER == 7 and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3 and cfg.SOLVER.BASE_LR == 0.01


def test_a_bad_base_names_the_file_and_the_key(tmp_path):
    from peft_d2.config import get_cfg, merge_config

    bad = tmp_path / "bad.yaml"
    bad.write_text('_BASE_: "model_zoo://COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_9x.yaml"\n')
    (tmp_path / "child.yaml").write_text("_BASE_: bad.yaml\n")
    with pytest.raises(PeftConfigError, match=(
            rf"^_BASE_ model_zoo://COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_9x.yaml in {bad}: detectron2's model "
            r"zoo has no config 'COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_9x.yaml' \(the names are paths under "
            r".*detectron2/model_zoo/configs\); closest: model_zoo://COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x"
            r".yaml, ")):
        merge_config(get_cfg(), str(tmp_path / "child.yaml"))
    bad.write_text('_BASE_: "model_zoo://nothing/like/it.yaml"\n')
    with pytest.raises(PeftConfigError, match=r"has no config 'nothing/like/it.yaml' .*; e.g. model_zoo://COCO-Inst"):
        merge_config(get_cfg(), str(bad))
    bad.write_text("_BASE_: missing.yaml\n")
    with pytest.raises(PeftConfigError, match=rf"^_BASE_ missing.yaml in {bad}: {tmp_path}/missing.yaml does not "
                       "exist$"):
        merge_config(get_cfg(), str(bad))
    with pytest.raises(PeftConfigError, match=rf"^Config file {tmp_path}/none.yaml does not exist$"):
        merge_config(get_cfg(), str(tmp_path / "none.yaml"))
    bad.write_text("VERSION: 1\n")
    with pytest.raises(PeftConfigError, match=rf"^VERSION 1 in {bad} \(or a file of its _BASE_ chain\): this "
                       "detectron2 reads VERSION 2 configs"):
        merge_config(get_cfg(), str(bad))


def test_an_option_after_the_overrides_is_a_usage_error(capsys):
    import argparse

    from peft_d2.config import parse_command_line

    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--adapter")
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parse_command_line(parser, ["--adapter", "a", "SEED", "-1", "OUTPUT_DIR", "x"])  # a negative value is fine
    assert args.adapter == "a" and args.opts == ["SEED", "-1", "OUTPUT_DIR", "x"]
    for argv, option in ((["SEED", "1", "--adapter", "a"], "--adapter"), (["SEED", "1", "--eval-only"], "--eval-only"),
                         (["SEED", "--adapter", "a"], "--adapter")):
        with pytest.raises(SystemExit) as e:
            parse_command_line(parser, argv)
        assert e.value.code == 2
        assert (f"tool: error: option {option} after the KEY VALUE config overrides (they start at 'SEED'), where it "
                "would be read as a config key: options go before the KEY VALUE overrides") in capsys.readouterr().err
