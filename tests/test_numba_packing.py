"""numba (in the worker extra) changes how fast INC packs RTN weights, not the results: the trial metrics,
the quantized models' outputs and their dequantized weights are bit-identical with and without it, and so
are the packed weights and scales. The one difference: INC 3.10's numba packer fills the unused padding bits
of `qzeros` (a layer whose out_features is not a multiple of 32 / bits) with whatever follows the row in
memory, where the torch loop writes zeros; unpacking ignores those bits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nsd.worker.sandbox import runner_env
from tests.conftest import DIGITS, ROOT

pytestmark = pytest.mark.slow

# Quantizes the digits CNN with RTN at the bit widths INC packs with numba (2, 4, 8) and one it does not
# (3), and saves every quantized state dict (packed qweight, scales, zeros) and metric. argv[1] == "off"
# hides numba from INC, as on a worker without it.
PACK = """
import json, sys, torch
if sys.argv[1] == "off":
    sys.modules["numba"] = None  # import numba -> ImportError: INC takes its torch packing loop
sys.path.insert(0, sys.argv[3])
import recipe
from neural_compressor.torch.algorithms.weight_only.modules import WeightOnlyLinear
from neural_compressor.torch.quantization import RTNConfig, quantize
from neural_compressor.torch.utils.environ import can_pack_with_numba
out, states = {"numba": bool(can_pack_with_numba())}, {}
for bits in (2, 3, 4, 8):
    for group_size in (-1, 16):
        q = quantize(recipe.load_model(), RTNConfig(bits=bits, group_size=group_size, use_layer_wise=False),
                     run_fn=recipe.calibrate, example_inputs=recipe.example_inputs())
        state = {k: v.clone() for k, v in q.state_dict().items()}
        state.update({f"{name}.recovered": m.recover() for name, m in q.named_modules()
                      if isinstance(m, WeightOnlyLinear)})
        with torch.no_grad():
            state["logits"] = q(recipe.X_TEST)
        states[f"{bits}/{group_size}"] = state
        out[f"{bits}/{group_size}"] = recipe.evaluate(q)
torch.save(states, sys.argv[2])
with open(sys.argv[2] + ".json", "w") as f:
    json.dump(out, f)
"""


def pack(mode: str, path) -> tuple[dict, dict]:
    import torch

    env = {**runner_env(1), "PYTHONPATH": str(ROOT), "LOGLEVEL": "WARNING"}
    subprocess.run([sys.executable, "-c", PACK, mode, str(path), str(DIGITS)], env=env, check=True, timeout=600,
                   cwd=path.parent)
    with open(f"{path}.json") as f:
        return torch.load(path, weights_only=True), json.load(f)


def test_rtn_packing_with_numba_is_bit_identical_to_without(tmp_path):
    import torch

    pytest.importorskip("numba")
    with_numba, metrics_with = pack("on", tmp_path / "numba.pt")
    if not metrics_with.pop("numba"):
        pytest.skip("numba is installed but INC cannot use it here (TBB missing)")
    without, metrics_without = pack("off", tmp_path / "torch.pt")
    assert metrics_without.pop("numba") is False
    assert metrics_with == metrics_without  # every trial metric, bitwise
    assert with_numba.keys() == without.keys()
    for config, state in with_numba.items():
        assert state.keys() == without[config].keys()
        assert any("qweight" in k for k in state) and any("recovered" in k for k in state), config
        for name, tensor in state.items():
            if name.endswith("qzeros"):  # padding bits may differ (see above): compared through `recovered`
                continue
            assert tensor.dtype == without[config][name].dtype and torch.equal(tensor, without[config][name]), \
                (config, name)
