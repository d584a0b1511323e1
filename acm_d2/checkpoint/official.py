"""The authors' released ACM checkpoint (their 2019 Detectron2 fork) in acm_d2's key layout.

Their blocks hold the module as `module`, with K as `add_mod`, Q as `sub_mod` and P as `mul_mod`:

    ...res{3,4,5}.{i}.module.add_mod.map_gen.0.{weight,bias}      -> ...context.k_logits.{weight,bias}
    ...res{3,4,5}.{i}.module.sub_mod.map_gen.0.{weight,bias}      -> ...context.q_logits.{weight,bias}
    ...res{3,4,5}.{i}.module.mul_mod.feature_gen.0.{weight,bias}  -> ...context.p_reduce.{weight,bias}
    ...res{3,4,5}.{i}.module.mul_mod.feature_gen.2.{weight,bias}  -> ...context.p_expand.{weight,bias}

Every other key is a standard Detectron2 Mask R-CNN key and is kept as it is. The tensors are the same
shapes in both layouts, and the maths is the same function (tests/test_checkpoint_official.py).
"""

import re
from typing import Dict

__all__ = ["OFFICIAL_TO_ACM_D2", "convert_official_state_dict"]

OFFICIAL_TO_ACM_D2 = {
    ".module.add_mod.map_gen.0.": ".context.k_logits.",
    ".module.sub_mod.map_gen.0.": ".context.q_logits.",
    ".module.mul_mod.feature_gen.0.": ".context.p_reduce.",
    ".module.mul_mod.feature_gen.2.": ".context.p_expand.",
}
_OFFICIAL_KEY = re.compile("|".join(re.escape(k) for k in OFFICIAL_TO_ACM_D2))


def convert_official_state_dict(state_dict: Dict) -> Dict:
    """Rename the ACM keys of an authors'-layout model state dict; keep every other key.

    Raises ValueError for a key under `.module.` that is not one of the four ACM parameters (a
    checkpoint of another layout), or when no ACM key is found at all.
    """
    converted, renamed = {}, 0
    for key, value in state_dict.items():
        new_key, n = _OFFICIAL_KEY.subn(lambda m: OFFICIAL_TO_ACM_D2[m.group(0)], key)
        if n == 0 and ".module." in key:
            raise ValueError(f"unknown key {key!r}: not an ACM parameter of the authors' layout")
        converted[new_key] = value
        renamed += n
    if renamed == 0:
        raise ValueError(
            "no ACM key of the authors' layout (…module.add_mod.map_gen.0.weight and friends) found: "
            "is this the authors' ACM checkpoint?"
        )
    return converted
