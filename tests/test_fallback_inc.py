"""The fallback search with real INC: op lists, FP32 local rules for RTN and static PT2E, and the whole search
end to end with real workers, against a sequential INC run of the same procedure in this process."""

from __future__ import annotations

import os
import sys

import pytest

from nsd.broker import search, tuner
from tests.conftest import RECIPES

os.environ.setdefault("LOGLEVEL", "WARNING")  # INC's log level, read when it is imported here

RECIPE = RECIPES / "fallback_mlp.py"
CONFIG_SET = [{"rtn": {"bits": [2, 3], "group_size": -1, "use_layer_wise": False}}]


def import_inc() -> None:
    """INC's RTN module binds `transformers` at its own import only if transformers was imported before it,
    yet tests it at call time: import transformers first, whichever test of this process runs first."""
    import transformers  # noqa: F401
    import neural_compressor.torch.quantization  # noqa: F401


def mlp_recipe():
    sys.path.insert(0, str(RECIPES))
    try:
        import fallback_mlp
    finally:
        sys.path.remove(str(RECIPES))
    return fallback_mlp


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mlp")
    r = mlp_recipe()
    paths = {}
    for arch in ("plain", "blocks"):
        paths[arch] = root / f"{arch}.pt"
        r.train(str(paths[arch]), arch)
    return paths


def inc_sequential(weights_path, tuning: dict, monkeypatch):
    """The procedure one trial at a time in this process, each trial quantized by INC: (trials, winner, met)."""
    import_inc()
    from neural_compressor.torch.quantization import quantize
    from neural_compressor.torch.quantization.autotune import _deepcopy_warp

    from nsd.quant.fallback import op_list, with_fallback
    from nsd.quant.inc import config_from_dict, expand

    monkeypatch.setenv("NSD_MODEL_PATH", str(weights_path))
    r = mlp_recipe()
    model = r.load_model()
    baseline = r.evaluate(_deepcopy_warp(model))
    configs = expand(tuning["config_set"], tuning.get("max_trials", 100))
    ops = op_list("rtn", model)
    layout = search.Layout(tuple("rtn" for _ in configs), {"rtn": search.OpList(
        tuple(ops["ops"]), tuple(map(tuple, ops["blocks"])))}, tuning.get("max_trials", 100))
    goal = tuner.Goal(baseline, tuning["tolerable_loss"], tuning.get("criterion", "relative"))

    def metric_of(stage, base, fallback):
        config = with_fallback(config_from_dict(configs[base]["config"]), fallback)
        return r.evaluate(quantize(_deepcopy_warp(model), config, run_fn=r.calibrate, inplace=True,
                                   example_inputs=r.example_inputs()))

    return (baseline, *search.sequential(layout, metric_of, lambda m: tuner.meets_goal(m, goal)))


@pytest.mark.slow  # trains the MLP and quantizes it with INC, here
def test_rtn_fallback_keeps_exactly_the_named_ops_float(weights, monkeypatch):
    import_inc()
    import torch
    from neural_compressor.torch.quantization import quantize

    from nsd.quant.fallback import float_modules, op_list, with_fallback
    from nsd.quant.inc import config_from_dict

    monkeypatch.setenv("NSD_MODEL_PATH", str(weights["blocks"]))
    r = mlp_recipe()
    model = r.load_model()
    listed = op_list("rtn", model)
    assert listed == {"ops": ["blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2", "head"],
                      "blocks": [["blocks.0.0", "blocks.0.2"], ["blocks.1.0", "blocks.1.2"]]}
    config = config_from_dict({"rtn": {"bits": 4, "use_layer_wise": False}})
    # "blocks.1.0" must not catch "blocks.1.0x" or be read as a regex: names are escaped and anchored
    q = quantize(r.load_model(), with_fallback(config, ["blocks.1.0", "head"]), inplace=True)
    assert float_modules(q, listed["ops"]) == {"blocks.0.0": False, "blocks.0.2": False, "blocks.1.0": True,
                                               "blocks.1.2": False, "head": True}
    assert torch.equal(dict(q.named_modules())["head"].weight, model.head.weight)  # untouched


def _tiny_bert():
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    model = BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(5, 50, (2, 12))
    return model, (ids, torch.ones_like(ids))


# torch's and INC's own deprecation notices while exporting, copying and converting graphs in this process
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
@pytest.mark.slow  # exports and quantizes with INC, here
def test_pt2e_excluded_op_stays_float_in_the_converted_graph():
    from neural_compressor.torch.export import export
    from neural_compressor.torch.quantization import quantize
    from neural_compressor.torch.quantization.autotune import _deepcopy_warp

    from nsd.quant.fallback import op_list, pt2e_quantized, with_fallback
    from nsd.quant.inc import config_from_dict

    model, inputs = _tiny_bert()
    graph = export(model, inputs)
    listed = op_list("static_quant", model, graph)
    assert len(listed["ops"]) == 12 and listed["ops"][-1] == "encoder.layer.1.output.dense"
    assert [len(b) for b in listed["blocks"]] == [6, 6]
    excluded = "encoder.layer.1.output.dense"

    def calibrate(m):
        m(*inputs)

    config = with_fallback(config_from_dict({"static_quant": {}}), [excluded])
    converted = quantize(_deepcopy_warp(graph), config, run_fn=calibrate, inplace=True, example_inputs=inputs)
    quantized = pt2e_quantized(converted, listed["ops"])
    assert quantized[excluded] is False  # its input and weight are not dequantize nodes
    assert all(quantized[op] for op in listed["ops"] if op != excluded)
    # the graph the fallback was built on is still usable: the copy, not the original, was converted
    again = quantize(_deepcopy_warp(graph), config_from_dict({"static_quant": {}}), run_fn=calibrate,
                     inplace=True, example_inputs=inputs)
    assert all(pt2e_quantized(again, listed["ops"]).values())
    # A python recipe's load_model() may return the graph itself: the same ops, blocks from numbered layers.
    assert op_list("pt2e_dynamic_quant", graph, graph) == listed
    # Dynamic PT2E: the same exact-name rule (activations quantized at run time, weights at convert).
    key = "encoder.layer.0.attention.self.key"
    config = with_fallback(config_from_dict({"pt2e_dynamic_quant": {"act_sym": False}}), [key])
    dynamic = quantize(_deepcopy_warp(graph), config, run_fn=calibrate, inplace=True, example_inputs=inputs)
    assert pt2e_quantized(dynamic, listed["ops"]) == {op: op != key for op in listed["ops"]}


# ------------------------------------------------------------------------------- end to end (slow)

def _spec(weights_path, **tuning) -> dict:
    return {"name": "mlp-fallback", "model": {"path": str(weights_path)},
            "recipe": {"kind": "python", "file": str(RECIPE)},
            "tuning": {"config_set": CONFIG_SET, **tuning}}


CASES = {  # (arch, tuning, the stage the answer comes from; None: nothing passes)
    "op-wise": ("plain", {"tolerable_loss": 0.005, "criterion": "absolute"}, "op-wise"),
    "accumulated": ("plain", {"tolerable_loss": 0.0}, "accumulated"),
    "nothing passes": ("plain", {"tolerable_loss": 0.0, "max_trials": 6}, None),
    "block-wise": ("blocks", {"tolerable_loss": 0.0}, "block-wise"),
}


@pytest.mark.slow
async def test_rtn_search_with_3_workers_equals_a_sequential_inc_run(client, start_workers, weights, monkeypatch,
                                                                     tmp_path):
    from neural_compressor.torch.quantization import load

    from nsd.quant.fallback import float_modules, op_list

    refs = {name: inc_sequential(weights[arch], {"config_set": CONFIG_SET, **tuning}, monkeypatch)
            for name, (arch, tuning, _) in CASES.items()}
    for name, (_, _, stage) in CASES.items():  # the cases do cover what they are named after
        baseline, run, winner, met = refs[name]
        assert met is (stage is not None) and (stage is None or run[winner].stage == stage), (name, run)
        assert all(s.state.value != "passed" for s in run if s.stage == "config")  # no config passes alone
    monkeypatch.delenv("NSD_MODEL_PATH")
    await start_workers(3)
    ids = {name: await client.submit(_spec(weights[arch], **tuning)) for name, (arch, tuning, _) in CASES.items()}
    for name, task_id in ids.items():
        result = await client.result(task_id, wait=True)
        baseline, run, winner, met = refs[name]
        assert result["state"] == "done" and result["baseline"] == baseline, name
        assert result["met_goal"] is met
        w = result["winner"]
        assert (w["index"], w["stage"], w["fallback"], w["metric"]) == \
            (winner, run[winner].stage, list(run[winner].fallback), run[winner].metric), name
        for tr, ref in zip(result["trials"], run):  # every trial nsd finished scored as in the sequential run
            if tr["state"] in ("passed", "failed_goal"):
                assert (tr["stage"], tr["fallback"], tr["metric"]) == (ref.stage, list(ref.fallback), ref.metric)
    # The fetched model keeps the winner's FP32 ops as plain nn.Linear, the rest quantized.
    result = await client.result(ids["accumulated"])
    path = await client.fetch(result["task_id"], tmp_path / "out")
    readme = (tmp_path / "out" / "README.md").read_text()
    assert all(f"`{op}`" in readme for op in result["winner"]["fallback"])
    monkeypatch.setenv("NSD_MODEL_PATH", str(weights["plain"]))
    r = mlp_recipe()
    model = load(str(path), original_model=r.load_model())
    ops = op_list("rtn", r.load_model())["ops"]
    assert float_modules(model, ops) == {op: op in result["winner"]["fallback"] for op in ops}
    assert r.evaluate(model) == result["winner"]["metric"]


@pytest.mark.slow
async def test_static_pt2e_search_runs_end_to_end_on_a_tiny_bert(client, start_workers, tmp_path):
    from tests.tiny_models import build_assets

    assets = build_assets(tmp_path / "assets")
    # Cosine against FP32 (1.0) with no loss allowed: the static config misses it, so the search goes on with
    # 2 block-wise trials (the 2 encoder layers: last one, then both) and the op-wise stage at once (cut at
    # max_trials). With both layers in FP32 every op is float: that trial reaches 1.0 and wins.
    spec = {"name": "bert-fallback", "model": {"path": str(assets["classifier"]), "shared": True},
            "recipe": {"kind": "feature-extraction", "data": str(assets["sentences"]), "eval_samples": 16,
                       "calibration_samples": 8},
            "tuning": {"config_set": [{"static_quant": {}}], "tolerable_loss": 0.0, "max_trials": 8,
                       "measure": "none"}}  # figures are tests/test_artifact_readme.py's
    await start_workers(2)
    result = await client.result(await client.submit(spec), wait=True)
    trials = result["trials"]
    assert result["state"] == "done" and result["artifact"], result["error"]
    assert [t["stage"] for t in trials] == ["config"] + ["block-wise"] * 2 + ["op-wise"] * 5
    assert [t["state"] for t in trials[:3]] == ["failed_goal", "failed_goal", "passed"]
    assert [len(t["fallback"]) for t in trials[1:3]] == [6, 12]  # the last layer, then both
    assert trials[3]["fallback"] == ["encoder.layer.1.output.dense"]  # op-wise runs bottom-up
    assert all(t["state"] in ("failed_goal", "cancelled") for t in trials[3:])  # ran speculatively, or stopped
    assert result["met_goal"] is True and result["winner"]["index"] == 2
    assert result["winner"]["metric"] == pytest.approx(1.0, abs=1e-12)
    assert result["winner"]["metric"] > trials[0]["metric"]
