"""INC's weight-only layers recovered at once (nsd.quant.unpack): the float weight INC's own first forward
computes, bit for bit, for every bit width, group size and zero point; and the model's outputs after it."""

from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("LOGLEVEL", "WARNING")
torch = pytest.importorskip("torch")


class Odd(torch.nn.Module):
    """Linear layers whose sizes are not multiples of any pack or group size (INC pads and slices them)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(70, 45)
        self.b = torch.nn.Linear(45, 33, bias=False)
        self.c = torch.nn.Linear(33, 64)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 16, 32])
@pytest.mark.parametrize("use_sym", [True, False])
def test_recovered_weights_are_incs_bit_for_bit(bits, group_size, use_sym):
    from neural_compressor.torch.algorithms.weight_only.modules import INCWeightOnlyLinear
    from neural_compressor.torch.quantization import RTNConfig, quantize

    from nsd.quant.unpack import recover_weights

    model = Odd().eval()
    x = torch.randn(5, 70, generator=torch.Generator().manual_seed(1))
    config = RTNConfig(bits=bits, group_size=group_size, use_sym=use_sym, use_layer_wise=False)
    q = quantize(copy.deepcopy(model), quant_config=config, example_inputs=(x,))
    ours = copy.deepcopy(q)
    assert recover_weights(ours) == 3
    with torch.no_grad():
        theirs_out = q(x)  # INC's first forward: unpack and recover, column by column
        ours_out = ours(x)
    layers = [(n, m) for n, m in q.named_modules() if isinstance(m, INCWeightOnlyLinear)]
    mine = dict(ours.named_modules())
    for name, layer in layers:
        assert layer.weight.dtype == mine[name].weight.dtype and torch.equal(layer.weight, mine[name].weight), name
        assert torch.equal(layer.g_idx, mine[name].g_idx)
    assert torch.equal(theirs_out, ours_out)
    assert recover_weights(ours) == 0  # done once: a layer with its weight is left alone
