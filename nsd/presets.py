"""Named config sets, so that a user need not know INC's config names (`nsd presets` prints them).

Pure data: the broker expands a preset at submit without importing INC. Every set here avoids the
combinations docs/inc-notes.md found broken on CPU without IPEX (8-bit asymmetric RTN, act_sym=True
dynamic quantization on BERT graphs, SmoothQuant, MX/mixed precision save).
"""

from __future__ import annotations

import copy
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "static": {
        "about": "int8 static quantization via PT2E (weights and activations; calibrated), "
                 "minmax then KL activation observers",
        "config_set": [{"static_quant": {"act_algo": ["minmax", "kl"]}}],
    },
    "dynamic": {
        "about": "int8 dynamic quantization via PT2E (weights int8, activations quantized at run time)",
        "config_set": [{"pt2e_dynamic_quant": {"act_sym": False, "w_granularity": ["per_channel", "per_tensor"]}}],
    },
    "woq": {
        "about": "weight-only RTN: 8-bit symmetric, then 4-bit with group sizes 32 and 128",
        "config_set": [{"rtn": {"bits": 8, "group_size": -1, "use_sym": True, "use_layer_wise": False}},
                       {"rtn": {"bits": 4, "group_size": [32, 128], "use_sym": True, "use_layer_wise": False}}],
    },
}
PRESETS["auto"] = {
    "about": "static, then dynamic, then weight-only: the first that keeps accuracy wins",
    "config_set": [c for name in ("static", "dynamic", "woq") for c in PRESETS[name]["config_set"]],
}


def config_set(preset: str) -> list[dict[str, Any]]:
    return copy.deepcopy(PRESETS[preset]["config_set"])
