"""`add_peft_config(cfg)`: the MODEL.PEFT node of a detectron2 config, its defaults and validation."""

from detectron2.config import CfgNode as CN

from .errors import PeftConfigError
from .tuners import AdapterConfig, CobotConfig, LoRAConfig, MoPEFTConfig, PeftConfig, PrefixConfig, SFAConfig


def add_peft_config(cfg: CN) -> CN:
    """Add MODEL.PEFT with its defaults to `cfg` (in place; returns it). Every key is documented in the README."""
    cfg.MODEL.PEFT = CN()
    # Methods to inject, any of: "lora", "adapter". Empty: no PEFT.
    cfg.MODEL.PEFT.METHODS = []
    # With MODEL.META_ARCHITECTURE "PEFT": the meta-architecture that is built and adapted.
    cfg.MODEL.PEFT.BASE_META_ARCHITECTURE = "GeneralizedRCNN"
    # With MODEL.BACKBONE.NAME "PEFTBackbone": the backbone that is built and adapted (alone).
    cfg.MODEL.PEFT.BASE_BACKBONE = "build_resnet_backbone"
    # An adapter checkpoint (safetensors from peft_d2) loaded after MODEL.WEIGHTS.
    cfg.MODEL.PEFT.WEIGHTS = ""
    # Glob patterns over base parameter names that stay trainable (heads, norms, biases).
    cfg.MODEL.PEFT.TRAINABLE = []

    # Training checkpoints of an injected model hold the trainable tensors only, unless this is True.
    cfg.MODEL.PEFT.FULL_CHECKPOINTS = False

    # Learning rate (0 = SOLVER.BASE_LR) and weight decay per parameter group of the PEFT optimizer.
    cfg.MODEL.PEFT.OPTIM = CN()
    cfg.MODEL.PEFT.OPTIM.LORA_LR = 0.0
    cfg.MODEL.PEFT.OPTIM.LORA_WEIGHT_DECAY = 0.0
    cfg.MODEL.PEFT.OPTIM.ADAPTER_LR = 0.0
    cfg.MODEL.PEFT.OPTIM.ADAPTER_WEIGHT_DECAY = 0.0
    cfg.MODEL.PEFT.OPTIM.HEAD_LR = 0.0  # trainable base parameters (MODEL.PEFT.TRAINABLE)

    cfg.MODEL.PEFT.LORA = CN()
    cfg.MODEL.PEFT.LORA.RANK = 8
    cfg.MODEL.PEFT.LORA.ALPHA = 8.0
    cfg.MODEL.PEFT.LORA.DROPOUT = 0.0
    cfg.MODEL.PEFT.LORA.RSLORA = False  # scale by alpha / sqrt(rank) instead of alpha / rank
    # Glob patterns over module paths, e.g. "backbone.*.attn.qkv", "*.self_attn".
    cfg.MODEL.PEFT.LORA.TARGETS = []
    # Linears of every MSDeformAttn (pixel decoder, or any module of that shape) that get LoRA: any of
    # "sampling_offsets", "attention_weights", "value_proj", "output_proj".
    cfg.MODEL.PEFT.LORA.MSDA_LAYERS = []
    # Row blocks of packed q/k/v projections that get LoRA ("" = the whole output of a qkv Linear).
    cfg.MODEL.PEFT.LORA.QKV_BLOCKS = "qv"

    # Prefix tuning (method "prefix"): learned keys/values prepended in attention.
    cfg.MODEL.PEFT.PREFIX = CN()
    cfg.MODEL.PEFT.PREFIX.LENGTH = 8
    cfg.MODEL.PEFT.PREFIX.HIDDEN = 0  # > 0: prefixes produced by an MLP of this width (reparameterisation)
    cfg.MODEL.PEFT.PREFIX.PLACEMENTS = ["attn"]  # "attn" (backbone blocks), "decoder_self_attn"
    cfg.MODEL.PEFT.PREFIX.BLOCKS = ["*"]

    # MoPEFT (method "mopeft"): per-block learned gates over the block's LoRA, prefix and adapters.
    cfg.MODEL.PEFT.MOPEFT = CN()
    cfg.MODEL.PEFT.MOPEFT.INIT_BIAS = 0.0

    # COBOT (method "cobot"): a shared relation matrix and hypercomplex projections over all LoRA slots.
    cfg.MODEL.PEFT.COBOT = CN()
    # the slots: "lora" (every LoRA row block) or "adapter" (every parallel adapter, ADAPTER.PLACEMENTS parallel_mlp)
    cfg.MODEL.PEFT.COBOT.BASE_METHOD = "lora"
    cfg.MODEL.PEFT.COBOT.DROPOUT = 0.1  # inside the adapter form

    # SFA (method "sfa"): external adapters + lottery-ticket internal weights under one budget.
    cfg.MODEL.PEFT.SFA = CN()
    cfg.MODEL.PEFT.SFA.BUDGET = 0  # total trainable SFA parameters; 0 = BUDGET_RATIO of the model
    cfg.MODEL.PEFT.SFA.BUDGET_RATIO = 0.01
    cfg.MODEL.PEFT.SFA.ADAPTER_FRACTION = 0.5  # share of the budget for external adapters
    cfg.MODEL.PEFT.SFA.ADAPTER_BOTTLENECK = 16
    cfg.MODEL.PEFT.SFA.TARGETS = ["*.attn.qkv", "*.attn.proj", "*.mlp.fc1", "*.mlp.fc2"]
    cfg.MODEL.PEFT.SFA.WARMUP_ITERS = 20
    cfg.MODEL.PEFT.SFA.WARMUP_LR = 1e-2  # SGD with momentum 0.9
    cfg.MODEL.PEFT.SFA.SCORE = "magnitude"  # |W_k - W_0|, or "grad": sum of |grad * W|
    cfg.MODEL.PEFT.SFA.RANKING = "global"  # or "layer"
    cfg.MODEL.PEFT.SFA.SEED = 0

    cfg.MODEL.PEFT.ADAPTER = CN()
    cfg.MODEL.PEFT.ADAPTER.NUM_PER_SITE = 1  # adapters chained at each sequential site: 1, 2 or 3
    cfg.MODEL.PEFT.ADAPTER.BOTTLENECK = 0  # hidden width; 0 = dim // REDUCTION
    cfg.MODEL.PEFT.ADAPTER.REDUCTION = 4
    # Backbone blocks: "attn", "mlp", "parallel_mlp"; head: "msdeform_attn", "decoder_self_attn", "decoder_cross_attn"
    cfg.MODEL.PEFT.ADAPTER.PLACEMENTS = ["attn"]
    cfg.MODEL.PEFT.ADAPTER.ACTIVATION = "relu"
    cfg.MODEL.PEFT.ADAPTER.PARALLEL_SCALE = 1.0
    cfg.MODEL.PEFT.ADAPTER.BLOCKS = ["*"]  # glob patterns over transformer-block paths
    return cfg


def peft_config_from_cfg(cfg: CN) -> PeftConfig:
    """The PeftConfig that MODEL.PEFT describes; raises PeftConfigError naming the key at fault."""
    p = cfg.MODEL.PEFT
    if not isinstance(p.METHODS, (list, tuple)):
        raise PeftConfigError(f"MODEL.PEFT.METHODS must be a list of method names, got {p.METHODS!r}")
    if not isinstance(p.LORA.RANK, int) or isinstance(p.LORA.RANK, bool):
        raise PeftConfigError(f"MODEL.PEFT.LORA.RANK must be an integer, got {p.LORA.RANK!r}")
    lora = LoRAConfig(
        r=p.LORA.RANK, alpha=float(p.LORA.ALPHA), dropout=float(p.LORA.DROPOUT), rslora=bool(p.LORA.RSLORA),
        targets=list(p.LORA.TARGETS), msda_layers=list(p.LORA.MSDA_LAYERS), qkv_blocks=p.LORA.QKV_BLOCKS,
    )
    a = p.ADAPTER
    adapter = AdapterConfig(
        num_per_site=a.NUM_PER_SITE, bottleneck=a.BOTTLENECK, reduction=a.REDUCTION, placements=tuple(a.PLACEMENTS),
        activation=a.ACTIVATION, parallel_scale=float(a.PARALLEL_SCALE), blocks=tuple(a.BLOCKS),
    )
    prefix = PrefixConfig(length=p.PREFIX.LENGTH, hidden=p.PREFIX.HIDDEN, placements=tuple(p.PREFIX.PLACEMENTS),
                          blocks=tuple(p.PREFIX.BLOCKS))
    f = p.SFA
    sfa = SFAConfig(
        budget=f.BUDGET, budget_ratio=float(f.BUDGET_RATIO), adapter_fraction=float(f.ADAPTER_FRACTION),
        adapter_bottleneck=f.ADAPTER_BOTTLENECK, targets=tuple(f.TARGETS), warmup_iters=f.WARMUP_ITERS,
        warmup_lr=float(f.WARMUP_LR), score=f.SCORE, ranking=f.RANKING, seed=f.SEED,
    )
    return PeftConfig(methods=tuple(p.METHODS), lora=lora, adapter=adapter, prefix=prefix,
                      mopeft=MoPEFTConfig(float(p.MOPEFT.INIT_BIAS)),
                      cobot=CobotConfig(p.COBOT.BASE_METHOD, float(p.COBOT.DROPOUT)), sfa=sfa,
                      trainable=tuple(p.TRAINABLE))


def config_functions() -> list:
    """The functions that add DeepLab's (poly LR schedule), Mask2Former's, ViT's (MODEL.VIT), SAM's
    (MODEL.SAM) and peft_d2's (MODEL.PEFT) keys to detectron2's default config, in order."""
    from detectron2.projects.deeplab import add_deeplab_config

    from .modeling.backbone.sam import add_sam_config
    from .modeling.config import add_maskformer2_config, add_vit_config

    return [add_deeplab_config, add_maskformer2_config, add_vit_config, add_sam_config, add_peft_config]


def get_cfg() -> CN:
    """detectron2's default config with every key of `config_functions()`: the config peft_d2's tools read."""
    from detectron2.config import get_cfg as d2_get_cfg

    cfg = d2_get_cfg()
    for fn in config_functions():
        fn(cfg)
    return cfg
