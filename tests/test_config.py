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
