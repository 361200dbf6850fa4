"""Writes configs/<dataset>/peft/*.yaml: one PEFT config per method and baseline, for every dataset.

    python tools/make_peft_configs.py          # rewrites the files (they are committed)

Each folder (the datasets' peft/ folders, and configs/synthetic/demo/ for the demo's model) gets a
Base-PEFT.yaml (the PEFT meta-architecture over its base config: Swin-B instance segmentation for the datasets,
heads trainable, PEFT learning rate 1e-3 as in the paper) and small files that add one method each.
"""

import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# folder under configs/ -> the base config it fine-tunes (relative to that folder)
BASES = {
    "coco/peft": "../instance-segmentation/swin/maskformer2_swin_base_IN21k_384_bs16_50ep.yaml",
    "cityscapes/peft": "../instance-segmentation/swin/maskformer2_swin_base_IN21k_384_bs16_90k.yaml",
    "ade20k/peft": "../instance-segmentation/swin/maskformer2_swin_base_IN21k_384_bs16_160k.yaml",
    "lvis/peft": "../instance-segmentation/swin/maskformer2_swin_base_IN21k_384_bs16_50ep.yaml",
    "synthetic/peft": "../maskformer2_swin_micro_bs4_B.yaml",
    "synthetic/demo": "../maskformer2_swin_demo_B.yaml",
    "dsb2018/peft": "../maskformer2_swin_dsb2018_tissue.yaml",
}

HEAD_SITES = '["msdeform_attn", "decoder_self_attn", "decoder_cross_attn"]'
BACKBONE_QKV = '["backbone.layers.*.blocks.*.attn.qkv"]'

METHODS = {
    "lora_backbone": ("LoRA (r=8) on q and v of every Swin attention", f"""
    METHODS: ["lora"]
    LORA:
      TARGETS: {BACKBONE_QKV}"""),
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
    "mona": ("Mona after attention and MLP of every Swin block", """
    METHODS: ["mona"]
    MONA:
      PLACEMENTS: ["attn", "mlp"]"""),
    "baseline_heads_only": ("baseline: class and mask heads only", """
    METHODS: []"""),
    "baseline_decoder_only": ("baseline: the transformer decoder (with heads)", """
    METHODS: []
    TRAINABLE: ["sem_seg_head.predictor.*"]"""),
    "baseline_whole_head": ("baseline: pixel decoder + transformer decoder (conventional fine-tuning)", """
    METHODS: []
    TRAINABLE: ["sem_seg_head.*"]"""),
}


def main():
    for name, base in BASES.items():
        folder = os.path.join(ROOT, name)
        dataset = name.split("/")[0] if name.endswith("/peft") else name
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "Base-PEFT.yaml"), "w") as f:
            f.write(f"""# PEFT over the {dataset} base model (written by tools/make_peft_configs.py)
_BASE_: {base}
MODEL:
  META_ARCHITECTURE: "PEFT"
  PEFT:
    BASE_META_ARCHITECTURE: "MaskFormer"
    TRAINABLE: ["sem_seg_head.predictor.class_embed.*", "sem_seg_head.predictor.mask_embed.*"]
    OPTIM:
      LORA_LR: 0.001
      ADAPTER_LR: 0.001
""")
        for name, (title, body) in METHODS.items():
            with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
                f.write(f"# {title} (written by tools/make_peft_configs.py)\n_BASE_: Base-PEFT.yaml\n"
                        f"MODEL:\n  PEFT:{body}\n")
        with open(os.path.join(folder, "full_finetune.yaml"), "w") as f:
            f.write(f"# baseline: full fine-tuning of the base model (written by tools/make_peft_configs.py)\n"
                    f"_BASE_: {base}\n")


if __name__ == "__main__":
    main()
