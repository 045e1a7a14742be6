"""Keeping ops in FP32 on INC 3.10, torch side: which ops a config family quantizes, which blocks the model
has, and a config with named ops left in FP32 (docs/inc-notes.md, "Keeping ops in FP32").

Names mean different things per family, so one helper turns an op name into each family's local key:
RTN's local keys are `re.match` patterns (anchored and escaped here), PT2E's are exact module names.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from nsd.spec import PT2E_CONFIGS

REGEX_FAMILIES = frozenset({"rtn"})  # weight-only configs whose local keys are op-name patterns
FALLBACK_FAMILIES = REGEX_FAMILIES | PT2E_CONFIGS  # the families the fallback stages run for
RTN_KEPT_FP32 = re.compile(r".*(lm_head|output_layer|embed_out)")  # RTN's own FP32 rules (quant_lm_head=False)
PT2E_OPS = ("linear", "conv1d", "conv2d")


def module_order(model) -> dict[str, int]:
    return {name: i for i, (name, _) in enumerate(model.named_modules())}


def rtn_ops(model) -> list[str]:
    """RTN's quantizable ops in `named_modules()` order, without the ones RTN already keeps in FP32."""
    from neural_compressor.torch.quantization import RTNConfig

    return [name for name, _ in RTNConfig.get_model_info(model) if not RTN_KEPT_FP32.match(name)]


def pt2e_ops(graph, model=None) -> list[str]:
    """The module names of the exported graph's linear/conv nodes, deduplicated, in `model`'s
    `named_modules()` order when the eager model is at hand (else graph order)."""
    import torch

    targets = {getattr(torch.ops.aten, op).default for op in PT2E_OPS}
    names: list[str] = []
    for node in graph.graph.nodes:
        stack = node.meta.get("nn_module_stack") if node.op == "call_function" and node.target in targets else None
        if stack:
            name = list(stack.values())[-1][0]
            name = name[len("L['self']."):] if name.startswith("L['self'].") else name
            if name not in names:
                names.append(name)
    if model is not None:
        order = module_order(model)
        names.sort(key=lambda n: order.get(n, len(order)))
    return names


def find_blocks(model, ops: Sequence[str]) -> list[list[str]]:
    """Children of an `nn.ModuleList` holding two or more of `ops` (e.g. transformer layers), module order.
    Without an eager model (a python recipe's PT2E graph), numbered children of a common parent stand in."""
    import torch

    blocks: list[list[str]] = []
    if model is not None and not isinstance(model, torch.fx.GraphModule):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.ModuleList):
                for child, _ in module.named_children():
                    prefix = f"{name}.{child}." if name else f"{child}."
                    inside = [op for op in ops if op.startswith(prefix)]
                    if len(inside) >= 2:
                        blocks.append(inside)
        return blocks
    groups: dict[str, list[str]] = {}
    for op in ops:
        m = re.match(r"(.*?\.\d+)\.", op)
        if m:
            groups.setdefault(m.group(1), []).append(op)
    return [g for g in groups.values() if len(g) >= 2]


def op_list(family: str, model, graph=None) -> dict[str, Any]:
    """{"ops": [...], "blocks": [[...], ...]} for one config family (empty where it has no fallback)."""
    if family in REGEX_FAMILIES:
        ops = rtn_ops(model)
        return {"ops": ops, "blocks": find_blocks(model, ops)}
    if family in PT2E_CONFIGS and graph is not None:
        import torch

        eager = model if not isinstance(model, torch.fx.GraphModule) else None
        ops = pt2e_ops(graph, eager)
        return {"ops": ops, "blocks": find_blocks(eager, ops)}
    return {"ops": [], "blocks": []}


def local_key(family: str, op: str) -> str:
    """The `set_local` key that names exactly this op in `family`'s configs."""
    return re.escape(op) + "$" if family in REGEX_FAMILIES else op


def with_fallback(config, fallback: Sequence[str]):
    """`config` (an INC config object, not yet given to quantize()) with `fallback` ops kept in FP32."""
    family = config.name
    if not fallback:
        return config
    if family not in FALLBACK_FAMILIES:
        raise ValueError(f"keeping ops in FP32 is not supported for {family} configs")
    cls = type(config)
    if family in REGEX_FAMILIES:
        # RTN takes use_layer_wise/model_path from the last op's config: copy the global values in.
        fp32 = cls(dtype="fp32", use_layer_wise=config.use_layer_wise, model_path=config.model_path)
    else:
        fp32 = cls(w_dtype="fp32", act_dtype="fp32")  # both, or the op stays quantized
    for op in fallback:
        config.set_local(local_key(family, op), fp32)
    return config


def float_modules(q_model, names: Sequence[str]) -> dict[str, bool]:
    """For a weight-only quantized module tree: whether each named module is still a plain float nn.Linear."""
    import torch

    modules = dict(q_model.named_modules())
    return {n: type(modules.get(n)) is torch.nn.Linear for n in names}


def pt2e_quantized(converted, names: Sequence[str]) -> dict[str, bool]:
    """For a converted PT2E graph: whether each named module's linear/conv reads dequantized input and weight."""
    import torch

    targets = {getattr(torch.ops.aten, op).default for op in PT2E_OPS}
    out: dict[str, bool] = {}
    for node in converted.graph.nodes:
        stack = node.meta.get("nn_module_stack") if node.op == "call_function" and node.target in targets else None
        if not stack:
            continue
        name = list(stack.values())[-1][0]
        name = name[len("L['self']."):] if name.startswith("L['self'].") else name
        if name in names:
            args = node.args[:2]
            out[name] = all(isinstance(a, torch.fx.Node) and "dequantize" in str(a.target) for a in args)
    return out
