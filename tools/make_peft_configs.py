"""Writes configs/<dataset>/peft/*.yaml: one PEFT config per method and baseline, for every dataset.

    python tools/make_peft_configs.py          # rewrites the files (they are committed)

Each folder (the datasets' peft/ folders, and configs/synthetic/demo/ for the demo's model) gets a
Base-PEFT.yaml (the PEFT meta-architecture over its base config: Swin-B instance segmentation for the datasets,
heads trainable, PEFT learning rate 1e-3 as in the paper) and small files that add one method each. The folders
of the datasets with an R50 Mask2Former (COCO, Cityscapes, ADE20K, LVIS) also get lora_resnet.yaml: the same
PEFT settings over the R50 instance-segmentation config, LoRA on the ResNet's and the pixel decoder's
convolutions.

Mona's width m (MONA.BOTTLENECK) is half the width of the base's first Swin stage: the paper's m = 64 at Swin-B
(128 wide) in the Swin-B folders, m = 16 in the folders over the micro models (Swin 32 wide: synthetic/peft,
synthetic/demo, dsb2018/peft), where m = 64 would make Mona 13% of the model.
"""

import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# folder under configs/ -> (the base config it fine-tunes, relative to that folder; the width of its Swin's first
# stage, MODEL.SWIN.EMBED_DIM, which sets Mona's width)
BASES = {
    "coco/peft": ("../instance-segmentation/swin/maskformer2_swin_base_IN21k_384_bs16_50ep.yaml", 128),
    "cityscapes/peft": ("../instance-segmentation/swin/maskformer2_swin_base_IN21k_384_bs16_90k.yaml", 128),
    "ade20k/peft": ("../instance-segmentation/swin/maskformer2_swin_base_IN21k_384_bs16_160k.yaml", 128),
    "lvis/peft": ("../instance-segmentation/swin/maskformer2_swin_base_IN21k_384_bs16_50ep.yaml", 128),
    "synthetic/peft": ("../maskformer2_swin_micro_bs4_B.yaml", 32),
    "synthetic/demo": ("../maskformer2_swin_demo_B.yaml", 32),
    "dsb2018/peft": ("../maskformer2_swin_dsb2018_tissue.yaml", 32),
}
# folder -> its dataset's R50 Mask2Former (instance segmentation), the base of lora_resnet.yaml
R50_BASES = {
    "coco/peft": "../instance-segmentation/maskformer2_R50_bs16_50ep.yaml",
    "cityscapes/peft": "../instance-segmentation/maskformer2_R50_bs16_90k.yaml",
    "ade20k/peft": "../instance-segmentation/maskformer2_R50_bs16_160k.yaml",
    "lvis/peft": "../instance-segmentation/maskformer2_R50_bs16_50ep.yaml",
}

HEAD_SITES = '["msdeform_attn", "decoder_self_attn", "decoder_cross_attn"]'
BACKBONE_QKV = '["backbone.layers.*.blocks.*.attn.qkv"]'
# the convolutions of the MSDeformAttn pixel decoder (peft_d2/modeling/pixel_decoder/msdeformattn.py): the input
# projections of the encoder's levels (input_proj.<level>.0, before their GroupNorm), the FPN part's lateral and
# output convolutions (adapter_<i>, layer_<i>; "?" so that their .norm does not match) and the mask-feature
# projection
PIXEL_DECODER_CONVS = ["sem_seg_head.pixel_decoder.input_proj.*.0", "sem_seg_head.pixel_decoder.adapter_?",
                       "sem_seg_head.pixel_decoder.layer_?", "sem_seg_head.pixel_decoder.mask_features"]
# the convolutions of a detectron2 ResNet's residual blocks (res2-res5: conv1-conv3, the shortcuts); not the stem
RESNET_CONVS = ["backbone.res*.*.conv?", "backbone.res*.*.shortcut"]


def targets(patterns) -> str:
    """`patterns` as the value of LORA.TARGETS: a YAML list, one pattern a line after the first."""
    return "[" + ",\n                ".join(f'"{p}"' for p in patterns) + "]"


PEFT_HEAD = """MODEL:
  META_ARCHITECTURE: "PEFT"
  PEFT:
    BASE_META_ARCHITECTURE: "MaskFormer"
    TRAINABLE: ["sem_seg_head.predictor.class_embed.*", "sem_seg_head.predictor.mask_embed.*"]
    OPTIM:
      LORA_LR: 0.001
      ADAPTER_LR: 0.001
"""

METHODS = {
    "lora_backbone": ("LoRA (r=8) on q and v of every Swin attention", f"""
    METHODS: ["lora"]
    LORA:
      TARGETS: {BACKBONE_QKV}"""),
    "lora_dora": ("DoRA (r=8): weight-decomposed LoRA on lora_backbone's sites, q and v of every Swin attention", f"""
    METHODS: ["lora"]
    LORA:
      TARGETS: {BACKBONE_QKV}
      DORA: True"""),
    "lora_conv": ("LoRA (r=8) on the convolutions of the MSDeformAttn pixel decoder\nits input projections, the FPN "
                  "part's lateral and output convolutions and the mask-feature projection", f"""
    METHODS: ["lora"]
    LORA:
      TARGETS: {targets(PIXEL_DECODER_CONVS)}"""),
    "lora_msdeformattn": ("LoRA (r=8) on sampling_offsets and value_proj of every MSDeformAttn", """
    METHODS: ["lora"]
    LORA:
      MSDA_LAYERS: ["sampling_offsets", "value_proj"]"""),
    **{f"adapters_{n}": (f"{n} sequential adapter(s) after each pixel-decoder and decoder attention", f"""
    METHODS: ["adapter"]
    ADAPTER:
      NUM_PER_SITE: {n}
      PLACEMENTS: {HEAD_SITES}""") for n in (1, 2, 3)},
    "lora_adapters": ("LoRA in the backbone and MSDeformAttn plus 2 adapters per head site", f"""
    METHODS: ["lora", "adapter"]
    LORA:
      TARGETS: {BACKBONE_QKV}
      MSDA_LAYERS: ["sampling_offsets", "value_proj"]
    ADAPTER:
      NUM_PER_SITE: 2
      PLACEMENTS: {HEAD_SITES}"""),
    "prefix": ("prefix tuning (8 tokens) in every Swin attention and the decoder self-attention", """
    METHODS: ["prefix"]
    PREFIX:
      LENGTH: 8
      PLACEMENTS: ["attn", "decoder_self_attn"]"""),
    "mopeft": ("MoPEFT: gated LoRA, prefix and adapter in every Swin block", f"""
    METHODS: ["lora", "prefix", "adapter", "mopeft"]
    LORA:
      TARGETS: {BACKBONE_QKV}
    PREFIX:
      LENGTH: 8
    ADAPTER:
      PLACEMENTS: ["mlp"]"""),
    "cobot_lora": ("COBOT over LoRA (r=8) on q and v of every Swin attention", f"""
    METHODS: ["lora", "cobot"]
    LORA:
      TARGETS: {BACKBONE_QKV}"""),
    "cobot_adapter": ("COBOT over a parallel adapter (width 16) beside every Swin MLP", """
    METHODS: ["adapter", "cobot"]
    ADAPTER:
      BOTTLENECK: 16
      PLACEMENTS: ["parallel_mlp"]
    COBOT:
      BASE_METHOD: adapter"""),
    "adapters_parallel": ("a parallel adapter (width 16) beside every Swin MLP: COBOT-adapter's base method", """
    METHODS: ["adapter"]
    ADAPTER:
      BOTTLENECK: 16
      PLACEMENTS: ["parallel_mlp"]"""),
    "sfa": ("SFA: external adapters + lottery-ticket internal weights, 1% budget", """
    METHODS: ["sfa"]
    SFA:
      BUDGET_RATIO: 0.01"""),
    "baseline_heads_only": ("baseline: class and mask heads only", """
    METHODS: []"""),
    "baseline_decoder_only": ("baseline: the transformer decoder (with heads)", """
    METHODS: []
    TRAINABLE: ["sem_seg_head.predictor.*"]"""),
    "baseline_whole_head": ("baseline: pixel decoder + transformer decoder (conventional fine-tuning)", """
    METHODS: []
    TRAINABLE: ["sem_seg_head.*"]"""),
}


def mona(swin_width: int) -> tuple:
    """Mona's entry for a base whose first Swin stage is `swin_width` wide: m = swin_width / 2 (the paper's 64 at
    Swin-B's 128)."""
    m = swin_width // 2
    why = "the paper's m at Swin-B (128 wide)" if swin_width == 128 else (
        f"half the {swin_width}-wide first stage of the micro Swin, the paper's ratio (m = 64 at Swin-B, 128 "
        "wide);\nm = 64 would make Mona 13% of the model")
    return f"Mona (m = {m}) after attention and MLP of every Swin block\nm = {m}: {why}", f"""
    METHODS: ["mona"]
    MONA:
      BOTTLENECK: {m}
      PLACEMENTS: ["attn", "mlp"]"""


LORA_RESNET = ("LoRA (r=8) on the convolutions of the {dataset} R50 Mask2Former: its ResNet and its pixel decoder\n"
               "the ResNet's res2-res5 blocks (conv1-conv3, the shortcuts; not the stem) and the pixel decoder's\n"
               "convolutions as in lora_conv.yaml; the PEFT settings of Base-PEFT.yaml", f"""
    METHODS: ["lora"]
    LORA:
      TARGETS: {targets(RESNET_CONVS + PIXEL_DECODER_CONVS)}""")


def header(title: str) -> str:
    """The comment lines a file starts with: `title`'s first line, who wrote the file, its further lines."""
    first, *more = title.split("\n")
    return f"# {first} (written by tools/make_peft_configs.py)\n" + "".join(f"# {line}\n" for line in more)


def main(root: str = ROOT):
    for name, (base, swin_width) in BASES.items():
        folder = os.path.join(root, name)
        dataset = name.split("/")[0] if name.endswith("/peft") else name
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "Base-PEFT.yaml"), "w") as f:
            f.write(f"# PEFT over the {dataset} base model (written by tools/make_peft_configs.py)\n"
                    f"_BASE_: {base}\n{PEFT_HEAD}")
        for method, (title, body) in {**METHODS, "mona": mona(swin_width)}.items():
            with open(os.path.join(folder, f"{method}.yaml"), "w") as f:
                f.write(f"{header(title)}_BASE_: Base-PEFT.yaml\n"
                        f"MODEL:\n  PEFT:{body}\n")
        if name in R50_BASES:
            title, body = LORA_RESNET
            with open(os.path.join(folder, "lora_resnet.yaml"), "w") as f:
                f.write(f"{header(title.format(dataset=dataset))}"
                        f"_BASE_: {R50_BASES[name]}\n{PEFT_HEAD}{body[1:]}\n")
        with open(os.path.join(folder, "full_finetune.yaml"), "w") as f:
            f.write(f"# baseline: full fine-tuning of the base model (written by tools/make_peft_configs.py)\n"
                    f"_BASE_: {base}\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
