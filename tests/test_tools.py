"""tools/gate_stats.py and tools/param_report.py on small models, tools/benchmark_train.py's command line (no timing
here: benchmarks print ratios); the scripts' docstrings and --help."""

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest
import torch
from _models import images, tiny_vit

from peft_d2 import AdapterConfig, LoRAConfig, PeftConfig, inject
from peft_d2.config import PeftConfigError
from peft_d2.tuners.prefix import PrefixConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def test_gate_stats_average_the_recorded_gates():
    import gate_stats

    model = tiny_vit()
    inject(model, PeftConfig(methods=("lora", "prefix", "adapter", "mopeft"),
                             lora=LoRAConfig(targets=["blocks.*.attn.qkv"]), prefix=PrefixConfig(length=2),
                             adapter=AdapterConfig(placements=("mlp",))))
    with torch.no_grad():
        for blk in model.blocks:
            blk.mopeft_gates.proj.weight.normal_()
    loader = [images(2), images(1) * 2]
    stats = gate_stats.gate_stats(model, loader)
    assert list(stats) == ["blocks.0", "blocks.1", "blocks.2"]
    # the recorded mean equals the mean of the gates computed image by image
    manual = []
    for x in (images(2), images(1) * 2):
        for i in range(x.shape[0]):
            model(x[i : i + 1])
            manual.append(model.blocks[1].mopeft_gates.current[0])
    expected = torch.stack(manual).mean(0)
    assert stats["blocks.1"] == pytest.approx({m: float(v) for m, v in zip(("lora", "prefix", "adapter"), expected)},
                                              rel=1e-5)
    assert not model.blocks[0].mopeft_gates.record


def test_param_report_counts_and_sizes(capsys):
    import param_report

    peft = ROOT / "configs" / "synthetic" / "peft"
    param_report.main(["--config-file", str(peft / "lora_backbone.yaml"), str(peft / "full_finetune.yaml"),
                       str(peft / "sfa.yaml")])
    out = capsys.readouterr().out
    rows = {line.split()[1]: line.split() for line in out.splitlines()[2:]}
    assert set(rows) == {"lora_backbone", "full_finetune", "sfa"}
    assert rows["full_finetune"][4] == "100.00" and float(rows["lora_backbone"][4]) < 5
    sfa = param_report.measure(param_report.load_cfg(str(peft / "sfa.yaml")))["report"]
    used = sfa["by_method"]["sfa"] + sfa["by_method"].get("adapter", 0)
    assert 0 < used <= 0.01 * (sfa["total"] - used)  # the SFA budget: 1% of the base model
    assert float(rows["lora_backbone"][7]) < 3  # adapter file under 3% of the full checkpoint


def test_param_report_prints_the_conv_lora_shares_of_resnet_models(capsys):
    """detectron2's Mask R-CNN R50-FPN (its config's _BASE_ a model-zoo config) and the R50 Mask2Former with LoRA on
    their convolutions; the ResNet patterns on a Swin base are reported as not applicable."""
    import param_report

    configs = ROOT / "configs"
    param_report.main(["--config-file", str(configs / "coco" / "mask_rcnn" / "mask_rcnn_R_50_FPN_3x_lora.yaml")])
    row = capsys.readouterr().out.splitlines()[2].split()
    assert row[:5] == ["own-base", "mask_rcnn_R_50_FPN_3x_lora", "45,222,832", "1,311,201", "2.90"]
    assert row[-2:] == ["lora=879,616,", "base=431,585"]
    peft = configs / "coco" / "peft"
    param_report.main(["--config-file", str(peft / "lora_resnet.yaml"), str(peft / "lora_conv.yaml"), "--bases",
                       str(configs / "coco" / "instance-segmentation" / "maskformer2_R50_bs16_50ep.yaml"),
                       str(configs / "synthetic" / "maskformer2_swin_micro_bs4_B.yaml")])
    rows = {tuple(line.split()[:2]): line for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows[("maskformer2_R50_bs16_50ep", "lora_resnet")].split()[2:5] == ["44,667,601", "915,537", "2.05"]
    assert "lora=697,344" in rows[("maskformer2_R50_bs16_50ep", "lora_resnet")]
    assert "lora=63,488" in rows[("maskformer2_R50_bs16_50ep", "lora_conv")]  # wider inputs than at Swin-B
    assert " ".join(rows[("maskformer2_swin_micro_bs4_B", "lora_resnet")].split()[2:]).startswith(
        "n/a not applicable: MODEL.PEFT.LORA.TARGETS: pattern 'backbone.res*.*.conv?' matches no")
    assert "lora=7,936" in rows[("maskformer2_swin_micro_bs4_B", "lora_conv")]


def test_benchmark_train_refuses_an_unknown_method_before_building(monkeypatch, capsys):
    import benchmark_train

    monkeypatch.setattr(benchmark_train, "build", lambda *a: pytest.fail("built a model"))
    with pytest.raises(SystemExit) as e:
        benchmark_train.main(["--methods", "lora_backbone", "lora"])
    assert e.value.code == 2
    peft = ROOT / "configs" / "synthetic" / "peft"
    assert (f"error: argument --methods: no config lora.yaml in {peft}; valid names: adapters_1, adapters_2, "
            "adapters_3, adapters_parallel, baseline_decoder_only, baseline_heads_only, baseline_whole_head, "
            "cobot_adapter, cobot_lora, lora_adapters, lora_backbone, lora_conv, lora_dora, lora_msdeformattn, mona, "
            "mopeft, prefix, sfa (or 'all')") in capsys.readouterr().err


def test_benchmark_train_all_is_every_config_and_skips_one_for_another_base(tmp_path, capsys):
    import benchmark_train

    peft = ROOT / "configs" / "synthetic" / "peft"
    known = benchmark_train.config_names(str(peft))
    assert benchmark_train.chosen(["all"], known)[:len(benchmark_train.DEFAULT)] == benchmark_train.DEFAULT
    assert sorted(benchmark_train.chosen(["all"], known)) == known  # mona, lora_dora, lora_conv... without a list
    assert benchmark_train.chosen(["sfa"], known) == ["sfa"]
    (tmp_path / "lora_backbone.yaml").write_text(f"_BASE_: {peft / 'lora_backbone.yaml'}\n")
    (tmp_path / "resnet_only.yaml").write_text(f"_BASE_: {peft / 'Base-PEFT.yaml'}\nMODEL:\n  PEFT:\n"
                                              "    METHODS: [lora]\n    LORA:\n"
                                              "      TARGETS: ['backbone.res*.*.conv?']\n")
    benchmark_train.main(["--methods", "all", "--peft-dir", str(tmp_path), "--batch", "1", "--size", "64",
                          "--steps", "1", "--rounds", "1"])
    out = capsys.readouterr().out
    assert re.search(r"^lora_backbone +[0-9,]+ +[0-9.]+ ", out, re.M)
    assert re.search(r"^skipped resnet_only \(not applicable to this base: .*backbone\.res\*\.\*\.conv\?", out, re.M)
    with pytest.raises(PeftConfigError, match="matches no"):  # named, it must apply
        benchmark_train.main(["--methods", "resnet_only", "--peft-dir", str(tmp_path), "--batch", "1", "--size",
                              "64", "--steps", "1", "--rounds", "1"])


def test_benchmark_multi_adapter_each_gives_every_method_its_rows(capsys):
    import benchmark_multi_adapter

    benchmark_multi_adapter.main(["--each", "--methods", "mona", "lora_conv", "--k", "2", "--batch", "2",
                                  "--size", "64", "--rounds", "1"])
    out = capsys.readouterr().out
    rows = re.findall(r"^(\S+) +(\d+) +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+$", out, re.M)
    assert rows == [("mona", "2"), ("lora_conv", "2")], out
    assert torch.is_grad_enabled(), "the tool switched gradients off for the whole test process"


def _docstring_source(path: Path) -> tuple[ast.Expr, list[str]]:
    """The module docstring's node and its lines as written in the file (without the quotes)."""
    src = path.read_text(encoding="utf-8")
    node = ast.parse(src).body[0]
    assert isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant), f"{path} has no module docstring"
    text = ast.get_source_segment(src, node)
    return node, text[text.index('"""') + 3: text.rindex('"""')].splitlines()


SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for folder in ("tools", "datasets")
                 for p in (ROOT / folder).glob("*.py") if ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))))


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_docstring_keeps_its_lines(script):
    """A `\\` at the end of an example line in a plain (non-raw) docstring joins it to the next line: the
    description that --help prints runs the example commands together. Raw docstrings keep them apart."""
    node, lines = _docstring_source(ROOT / script)
    assert len(node.value.value.splitlines()) == len(lines), (
        f"{script}: its docstring loses line breaks (a line ending in a backslash in a non-raw string); "
        'write it as r"""..."""'
    )


@pytest.mark.parametrize("script", ["param_report", "benchmark_train", "merge_adapter", "gate_stats",
                                    "benchmark_multi_adapter"])
def test_help_prints_each_example_line_apart(script, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    shown = {line.rstrip() for line in capsys.readouterr().out.splitlines()}
    _, lines = _docstring_source(ROOT / "tools" / f"{script}.py")
    examples = [line.rstrip() for i, line in enumerate(lines)  # commands and their continuation lines
                if line.lstrip().startswith("python ") or (i and lines[i - 1].rstrip().endswith("\\"))]
    assert examples and any(line.endswith("\\") for line in examples), "no multi-line example to check"
    missing = [line for line in examples if line not in shown]
    assert not missing, f"--help of tools/{script}.py runs these example lines together: {missing}"
