"""The README beside a fetched model (`nsd fetch`, and the REST artifact tar): what won, what it measured
against FP32 on which cores, and exactly how to load and run it the way it was measured. Pure: the task view
in, Markdown out; written in this one place.

Its first Python block is complete: run in the fetched folder, it defines `model`, loaded and (for PT2E
graphs) compiled as measured (`tests/test_artifact_readme.py` runs it verbatim in a fresh process)."""

from __future__ import annotations

from nsd.figures import best_form, human_bytes, ms, summary
from nsd.spec import PT2E_CONFIGS


def loading_readme(task: dict, name: str) -> str:
    winner = task["winner"]
    (config_name, _), = winner["config"].items()
    weight_only = config_name not in PT2E_CONFIGS
    ops = winner.get("fallback") or []
    fallback = (f"The fallback search ({winner.get('stage')} stage) kept these {len(ops)} ops in FP32; they are "
                f"plain float modules in the saved model:\n\n" + "".join(f"- `{op}`\n" for op in ops) + "\n"
                if ops else "")
    objective = task.get("objective") or "first"
    why = ("the lowest-index trial meeting the goal (INC's answer)" if objective == "first" else
           f"of the trials meeting the goal, the best by {_objective(objective)} (figures within "
           f"{task.get('objective_margin', 0.05):.0%} of the best tie; the earliest wins)")
    return (f"# {task['name']}: quantized by nsd\n\n"
            f"Task `{task['task_id']}` ran {len(task['trials'])} trials; trial {winner['index']} won "
            f"(`{winner['label']}`, metric {winner['metric']:.6g} against an FP32 baseline of "
            f"{task['baseline']:.6g}; goal met: {str(task['met_goal']).lower()}): {why}.\n\n"
            f"{fallback}`{name}/` is the model exactly as it was measured (INC's format, with `nsd.json` "
            f"describing the trial and its figures); `result.json` is the whole task result.\n\n"
            f"{figures_section(task, winner)}"
            f"## Load it\n\nNeeds `pip install torch==2.13.0 neural-compressor-pt==3.10`; run in this folder:\n\n"
            f"```python\n{load_snippet(name, weight_only, winner.get('figures'), _builtin(task))}```\n\n"
            f"## Run it\n\n{run_text(weight_only, winner.get('figures'))}")


def load_snippet(name: str, weight_only: bool, figures: dict | None, hugging_face: bool = True) -> str:
    """Complete Python that defines `model` as it was measured."""
    form = best_form(figures)
    threads = form["threads"] if form else None
    lines = ["import torch"]
    if not weight_only:  # a fresh process must know the graph's ops and (for transformers) its output types
        lines += ["import torch._inductor.config",
                  "import torch.ao.quantization.fx._decomposed  # registers the quantize/dequantize ops it holds"]
        lines += ["import transformers.modeling_outputs  # registers the output types the saved graph returns"
                  if hugging_face else "# import the module defining your model's output types, if not plain tensors"]
    lines += ["from neural_compressor.torch.quantization import load", ""]
    if threads:
        lines.append(f"torch.set_num_threads({threads})  # as measured (pin the process: taskset -c "
                     f"{_cpus(form['cores'])})")
    if weight_only:
        lines += ["fp32_model = ...  # the FP32 model the task tuned (your recipe's load_model(), in eval mode)",
                  f"model = load({name!r}, original_model=fp32_model)  # eager: INC's WeightOnlyLinear"]
    else:
        compile_s = form.get("compile_s") if form else None
        when = f" ({compile_s:.1f} s when measured)" if compile_s is not None else ""
        lines += ["torch._inductor.config.freezing = True  # int8 weights into int8 GEMMs: the measured speed",
                  f"model = load({name!r})  # a torch.fx GraphModule: positional inputs only",
                  f"model = torch.compile(model)  # compiles at the first call{when}"]
    return "\n".join(lines) + "\n"


def run_text(weight_only: bool, figures: dict | None) -> str:
    names = (figures or {}).get("input", {}).get("names") or []
    shapes = (figures or {}).get("input", {}).get("shapes") or []
    args = ", ".join(names) if names else "*inputs"
    shown = ", ".join(f"`{n}` {'x'.join(map(str, s))}" for n, s in zip(names, shapes) if s) if names else ""
    text = (f"```python\nwith torch.no_grad():\n    outputs = model({args})\n```\n\n"
            + ("Inputs go by position, in this order (a PT2E graph refuses keyword arguments: `model(**batch)` "
               "fails with \"kwarg keyword mismatch\")" if not weight_only else "Inputs as the FP32 model takes them")
            + (f"; measured with {shown}.\n" if shown else ".\n"))
    return text


def figures_section(task: dict, winner: dict) -> str:
    """The winner's figures against FP32's, as measured, and where."""
    figures, fp32 = winner.get("figures"), task.get("baseline_figures")
    if not figures:
        return ("## Measured\n\nNo deployment figures were taken (tuning.measure = \"none\", or the recipe gives no "
                "benchmark_inputs()).\n\n")
    rows = [("FP32 " + f["form"].removeprefix("fp32-"), f, fp32) for f in (fp32 or {}).get("forms", [])]
    rows += [(f"this model ({f['form']})", f, figures) for f in figures["forms"]]
    table = ["| model | runtime | latency per batch, p50 (p90, spread) | throughput | peak memory | size |",
             "|---|---|---|---|---|---|"]
    for label, f, owner in rows:
        table.append(f"| {label} | {f['runtime']} | {ms(f['p50_ms'])} ({ms(f['p90_ms'])}, "
                     f"{f['spread']:.0%}; {f['repeats']} runs) | {f['throughput']:.4g} samples/s | "
                     f"{human_bytes(f.get('peak_bytes'))} | {human_bytes(owner.get('size_bytes'))} |")
    s = summary(figures, fp32)
    form = best_form(figures)
    on = winner.get("measured_on") or {}
    where = (f"on {on.get('cpu', 'an unknown CPU')} ({', '.join(on.get('isa') or []) or 'no AVX-512 VNNI/AMX'}), "
             f"cores {_cpus(form['cores'])}, {form['threads']} torch thread{'s' if form['threads'] != 1 else ''}, "
             f"the worker's other runners paused while timing: {str(form['exclusive']).lower()}")
    lines = [f"## Measured\n\nOne batch ({_shape(figures)}) {where}. Warm-up first; compile time is not in the "
             f"latency.\n", *table, ""]
    if s["speedup"] is not None:
        lines.append(f"Speed-up against the best FP32 form: **{s['speedup']:.2f}x**; size "
                     f"{human_bytes(s['size_bytes'])}" + (f" ({s['size_ratio']:.2f}x FP32's weights)"
                                                           if s["size_ratio"] else "") + ".")
    for note in [form.get("note"), *figures.get("notes", [])]:
        if note:
            lines.append(f"\nNote: {note}.")
    return "\n".join(lines) + "\n\n"


def _builtin(task: dict) -> bool:
    return ((task.get("spec") or {}).get("recipe") or {}).get("kind", "python") != "python"


def _shape(figures: dict) -> str:
    shapes = [s for s in figures.get("input", {}).get("shapes", []) if s]
    return " x ".join(map(str, shapes[0])) if shapes else "as the recipe gives it"


def _cpus(cores: list[int]) -> str:
    return ",".join(map(str, cores))


def _objective(objective) -> str:
    if isinstance(objective, dict):
        return "weighted " + " + ".join(f"{w:g} x {k}" for k, w in objective.items())
    return {"latency": "latency", "throughput": "throughput", "memory": "memory", "size": "size on disk"}.get(
        objective, str(objective))
