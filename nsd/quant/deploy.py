"""A quantized model as it is deployed: written in its smallest form, loaded back the way its README says,
run in the runtime that makes it fast — and measured there (`nsd.quant.measure`). Torch side.

Forms (docs/inc-notes.md, "What a quantized model costs to run"):
- PT2E graphs (static_quant, pt2e_dynamic_quant): INC converts without folding, so its graph keeps every
  float weight beside quantize/dequantize nodes (a static int8 MiniLM saves 91.7 MB, more than FP32). The
  artifact folds the weight quantization (torchao's `constant_fold` with `_quant_node_constraint`, exactly
  what `convert_pt2e(fold_quantize=True)` does: bit-identical outputs), drops the float weights nothing
  reads any more, and is saved by INC's PT2E save (`quantized_weight.pt`: a `torch.export` archive with int8
  weights; `load()` reads it). It runs under `torch.compile` (inductor) with `freezing = True`, which turns
  the dequantize + linear patterns into int8 GEMMs: the only form in which int8 is fast on CPU.
- weight-only configs (rtn, gptq, ...): INC's save (packed integer weights); loaded with INC's `load(folder,
  original_model=fp32)` and run eagerly: INC's WeightOnlyLinear dequantizes its weights at run time (no
  integer kernel on CPU), so expect size and memory gains, not speed.
- FP32: eagerly and compiled (inductor, freezing), so that every speed-up is against the faster of the two.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from typing import Any, Callable, Iterator

from nsd.quant import measure
from nsd.spec import PT2E_CONFIGS

COMPILED = "torch.compile (inductor, freezing)"
EAGER = "eager"
WOQ_NOTE = ("INC's WeightOnlyLinear dequantizes its weights at run time (no integer kernel on CPU): a slow "
            "unpacking path; expect size and memory gains, not speed")


def is_pt2e(config: dict) -> bool:
    return any(name in PT2E_CONFIGS for name in config)


# ---- the artifact's form ------------------------------------------------------------------------------


def fold_weights(graph) -> None:
    """Store a converted PT2E graph's weights as int8 (in place): fold each weight's quantize op into an
    int8 constant, as `convert_pt2e(fold_quantize=True)` does (INC converts with False), then drop the float
    weights no node reads any more. The graph computes bit-identical outputs."""
    from torchao.quantization.pt2e.constant_fold import constant_fold
    from torchao.quantization.pt2e.quantize_pt2e import _quant_node_constraint

    constant_fold(graph, _quant_node_constraint)
    read = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for name in [n for n, _ in (*graph.named_parameters(), *graph.named_buffers())]:
        if name in read:
            continue
        owner, _, attr = name.rpartition(".")
        module = graph.get_submodule(owner) if owner else graph
        module._parameters.pop(attr, None)
        module._buffers.pop(attr, None)


def write_artifact(q_model, folder: str, config: dict, example_inputs) -> None:
    """INC's save of a quantized model into `folder`, PT2E graphs folded to int8 first (`fold_weights`)."""
    if is_pt2e(config):
        fold_weights(q_model)
        # INC's save() passes the folder where PT2E's save wants example inputs: call the PT2E save itself.
        q_model.save(example_inputs=example_inputs, output_dir=folder)
    else:
        from neural_compressor.torch.quantization import save as inc_save

        inc_save(q_model, folder)


def load_artifact(folder: str, config: dict, fp32_model=None):
    """The model in `folder`, loaded as its README says: INC's `load` (weight-only: onto a copy of FP32)."""
    from neural_compressor.torch.quantization import load

    if is_pt2e(config):
        return load(folder)
    from neural_compressor.torch.quantization.autotune import _deepcopy_warp

    return load(folder, original_model=_deepcopy_warp(fp32_model))


@contextlib.contextmanager
def freezing() -> Iterator[None]:
    """Inductor's freezing on, for the calls that compile (compilation happens at a compiled model's first
    call): weights become constants, and PT2E's dequantize + linear become int8 GEMMs."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True):
        yield


# ---- measuring ----------------------------------------------------------------------------------------


def measure_form(form: str, runtime: str, make: Callable[[], Any], inputs: tuple, compiled: bool,
                 exclusive: Callable[[], contextlib.AbstractContextManager], policy: measure.Policy,
                 note: str | None = None) -> dict:
    """One form's figures: load it (`make`), compile it where asked (counted apart, as `compile_s`), warm
    it up, then time batches with this slot's cores to itself (`exclusive`); peak memory over all of it."""
    import torch

    memory = measure.PeakMemory()
    memory.start()
    t0 = time.perf_counter()
    model = make()
    load_s = time.perf_counter() - t0
    compile_s = None
    with torch.no_grad():
        if compiled:
            model = torch.compile(model)
            t1 = time.perf_counter()
            with freezing():
                model(*inputs)  # compiles
            compile_s = time.perf_counter() - t1
        load_bytes = memory.peak_bytes()  # loading, compiling and the first call
        with exclusive() as paused:
            memory.restart_mark()
            samples = measure.time_calls(lambda: model(*inputs), policy)
            run_bytes = memory.peak_bytes()  # serving batches, the model resident
    peak = None if load_bytes is None or run_bytes is None else max(load_bytes, run_bytes)
    del model
    return {"form": form, "runtime": runtime, **measure.summary(samples, batch_size(inputs)),
            "batch": batch_size(inputs), "load_s": load_s, "compile_s": compile_s,
            "peak_bytes": peak, "run_bytes": run_bytes, "cores": sorted(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
            "exclusive": paused is not None, "paused": paused or 0, "note": note}


def batch_size(inputs: tuple) -> int:
    for value in inputs:
        shape = getattr(value, "shape", None)
        if shape is not None and len(shape) > 0:
            return int(shape[0])
    return 1


def describe_inputs(inputs: tuple, names: list[str] | None) -> dict:
    """What the timed batch was: each positional input's name (where known) and shape."""
    shapes = [list(getattr(v, "shape", [])) if v is not None else None for v in inputs]
    return {"names": list(names or [])[:len(inputs)], "shapes": shapes}


def fp32_figures(model, inputs: tuple, names: list[str] | None, exclusive, policy: measure.Policy,
                 scratch: str) -> dict:
    """The FP32 model eagerly and compiled (each on a fresh copy), and its weights' bytes as torch.save
    writes them."""
    from neural_compressor.torch.quantization.autotune import _deepcopy_warp
    import torch

    forms, notes = [], []
    for form, compiled in (("fp32-eager", False), ("fp32-compiled", True)):
        try:
            forms.append(measure_form(form, COMPILED if compiled else EAGER, lambda: _deepcopy_warp(model),
                                      inputs, compiled, exclusive, policy))
        except Exception as exc:  # e.g. a model inductor cannot compile: the other form still counts
            notes.append(f"{form}: {type(exc).__name__}: {exc}"[:300])
    path = os.path.join(scratch, "fp32-state-dict.pt")
    torch.save(model.state_dict(), path)
    size = os.path.getsize(path)
    os.remove(path)
    if not forms:
        raise RuntimeError("; ".join(notes))
    return {"size_bytes": size, "size_of": "FP32 weights as torch.save writes them", "forms": forms,
            "input": describe_inputs(inputs, names), "notes": notes}


def quantized_figures(folder: str, config: dict, fp32_model, inputs: tuple, names: list[str] | None,
                      exclusive, policy: measure.Policy) -> dict:
    """The saved artifact in `folder`, loaded and run as its README says; its bytes on disk."""
    files = [os.path.join(folder, f) for f in os.listdir(folder) if f != "nsd.json"]
    if is_pt2e(config):
        form = measure_form("int8-compiled", COMPILED, lambda: load_artifact(folder, config), inputs, True,
                            exclusive, policy)
    else:
        form = measure_form("weight-only-eager", f"{EAGER} (INC load)",
                            lambda: load_artifact(folder, config, fp32_model), inputs, False, exclusive, policy,
                            note=WOQ_NOTE)
    return {"size_bytes": measure.tree_bytes(files), "size_of": "the saved artifact (model/ without nsd.json)",
            "forms": [form], "input": describe_inputs(inputs, names), "notes": []}


def describe(folder: str, job: dict, metric: float | None, figures: dict | None) -> None:
    """nsd.json beside the saved model: which trial it is, and what it measured."""
    (name, _), = job["config"].items()
    with open(os.path.join(folder, "nsd.json"), "w") as f:
        json.dump({"task_id": job["task_id"], "trial": job["index"], "config": job["config"],
                   "fallback": list(job.get("fallback") or []), "metric": metric,
                   "weight_only": name not in PT2E_CONFIGS, "recipe": job["spec"]["recipe"]["kind"],
                   "figures": copy.deepcopy(figures)}, f, indent=2)
