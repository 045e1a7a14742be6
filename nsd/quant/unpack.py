"""The float weights of INC's weight-only layers, computed at once instead of column by column.

INC 3.10's `INCWeightOnlyLinear` keeps its weight packed; its first forward unpacks it (a numpy loop over
every packed column and bit field) and recovers the float weight (a torch loop over every input column),
then keeps it as `self.weight`. On MiniLM that is 1-2 s per trial, more than the evaluation itself. Here
the same element-wise operations run on whole tensors — the same shifts and masks on the same integers,
the same integer subtraction and int8 wrap, the same float products, in the same dtypes — so the weight
is bit for bit the one INC's forward would compute (`tests/test_unpack.py` compares them for every bit
width, group size and zero point). INC's own `unpack()` still decides layout (formats, transposes, the
slicing of padding); only its per-column `unpack_tensor` is replaced, for that call. Layers in a format
this does not know (nf4, fp4: a float mapping) are left to INC's forward.
"""

from __future__ import annotations

import numpy as np
import torch


def recover_weights(model: torch.nn.Module) -> int:
    """Give every INC weight-only layer of `model` the float weight its first forward would give it; the
    number of layers done."""
    from neural_compressor.torch.algorithms.weight_only.modules import INCWeightOnlyLinear

    done = 0
    for module in model.modules():
        if isinstance(module, INCWeightOnlyLinear) and not hasattr(module, "weight") and "int" in module.dtype \
                and module.scales.device.type == "cpu":
            _set_weight(module, _recover(module))
            done += 1
    return done


def _set_weight(module, weight: torch.Tensor) -> None:
    """What INCWeightOnlyLinear.forward does with a recovered weight before it keeps it."""
    if weight.dtype == torch.float16 and module.scales.device.type == "cpu":
        weight = weight.float()
        module.bias = module.bias.float() if module.bias is not None else None
    module.weight = weight


def _recover(module) -> torch.Tensor:
    """INCWeightOnlyLinear.recover for integer formats, on whole tensors."""
    params = _unpack(module)
    weight, scales, zp = params.get("int_weight"), params.get("scales"), params.get("zp")
    if module.g_idx is None:  # as recover() sets it (the saved model's attributes stay the same)
        module.g_idx = torch.tensor([i // module.group_size for i in range(module.in_features)],
                                    dtype=torch.int32).to(scales.device)
    columns = module.g_idx.long()
    fp32_weight = torch.zeros(module.out_features, module.in_features, dtype=module.float_type).to(scales.device)
    if zp is not None:
        fp32_weight[:, :] = (torch.subtract(weight, zp[:, columns]).to(torch.int8)) * scales[:, columns]
    else:
        fp32_weight[:, :] = weight * scales[:, columns]
    return fp32_weight.to(scales.device)


def _unpack(module):
    """INC's own unpack(), with its tensor unpacking done on whole arrays for this call."""
    module.unpack_tensor = lambda packed: unpack_tensor(module, packed)
    try:
        return module.unpack()
    finally:
        del module.unpack_tensor


def unpack_tensor(module, packed_tensor: torch.Tensor) -> torch.Tensor:
    """INCWeightOnlyLinear.unpack_tensor_with_numpy, one bit field at a time over every column at once."""
    packed_array = packed_tensor.cpu().numpy()
    target_dtype = np.int16
    if module.bits == 8 and module.compression_dtype == torch.int8 and hasattr(module, "qzeros"):
        target_dtype = np.uint8  # (INC: unpacking uint8 data from an int8 compression dtype)
    unpacked = np.zeros((packed_array.shape[0], packed_array.shape[1] * module.n_pack), dtype=target_dtype)
    mask = np.uint8(2**module.bits - 1)
    for e in range(module.n_pack):
        tmp = np.left_shift(packed_array, module.compress_bits - module.bits * (e + 1))
        tmp = np.right_shift(tmp, module.compress_bits - module.bits)
        if hasattr(module, "qzeros"):
            tmp &= mask
        unpacked[:, e::module.n_pack] = tmp.astype(target_dtype)
    return torch.from_numpy(unpacked).to(device=packed_tensor.device)
