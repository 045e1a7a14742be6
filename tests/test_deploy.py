"""The deployed form of a quantized model (`nsd.quant.deploy`) and the worker's side of measuring it: int8 weights
stored as int8 with outputs bit-identical to INC's graph, a measuring runner gets its worker's machine to itself
(the other runners really stopped), and an objective on a recipe without a benchmark batch is one clear line."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from pathlib import Path

import pytest

from nsd.worker.slots import RunnerProcess, SlotPool
from tests.conftest import digits_spec, tiny_encoder


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")  # torch's own, on PT2E load
def test_the_artifact_stores_int8_weights_and_computes_what_incs_graph_computes(tmp_path):
    import torch
    from neural_compressor.torch.quantization import load, quantize
    from neural_compressor.torch.quantization.autotune import _deepcopy_warp

    from nsd.quant import deploy
    from nsd.quant.inc import config_from_dict
    from nsd.quant.recipes import load_recipe
    from nsd.spec import validate

    assets = tiny_encoder(tmp_path / "encoder")
    spec = validate({"model": {"path": str(assets["model"]), "shared": True},
                     "recipe": {"kind": "feature-extraction", "data": str(assets["sentences"]), "seq_len": 32,
                                "batch_size": 8, "eval_samples": 16, "calibration_samples": 8},
                     "tuning": {"preset": "static"}}).to_dict()
    recipe = load_recipe(spec)
    model = recipe.load_model()
    inputs = recipe.example_inputs()
    graph = recipe.export(model, inputs)
    config = {"static_quant": {"act_algo": "minmax"}}
    q = quantize(_deepcopy_warp(graph), config_from_dict(config), run_fn=recipe.calibrate, inplace=True,
                 example_inputs=inputs)
    from neural_compressor.torch.algorithms.pt2e_quant.save_load import save as pt2e_save

    inc_form = _deepcopy_warp(q)  # (INC's save turns the model's qconfig into dicts: one save per model)
    inc_form.qconfig = dict(q.qconfig)
    pt2e_save(inc_form, inputs, str(tmp_path / "inc"))  # INC's form: float weights beside q/dq nodes
    batch = recipe.benchmark_inputs()
    assert [tuple(x.shape) for x in batch] == [(8, 32)] * 3  # batch_size x seq_len, positional
    with torch.no_grad():
        reference = q(*batch)[0]
    deploy.write_artifact(q, str(tmp_path / "nsd"), config, inputs)
    ours = load(str(tmp_path / "nsd"))
    with torch.no_grad():
        assert torch.equal(ours(*batch)[0], reference)  # folding is exact
    weights = {name: t.dtype for name, t in ours.state_dict().items()}
    assert sum(d is torch.int8 for d in weights.values()) == 12  # 6 linears x 2 layers, stored as int8
    assert not any("query.weight" in n or "dense.weight" in n for n in weights)  # no float copy left
    inc_size = (tmp_path / "inc" / "quantized_weight.pt").stat().st_size
    assert (tmp_path / "nsd" / "quantized_weight.pt").stat().st_size < 0.7 * inc_size


FAKE_RUNNER = textwrap.dedent('''
    """A stand-in runner speaking the real pipe protocol: asks for the machine, reads the state of the other
    runner's processes while it holds it, then gives it back and answers."""
    import sys
    from nsd.worker import pipe
    jobs, answers = sys.stdin.buffer, sys.stdout.buffer
    answers.write(pipe.encode({"ready": True})); answers.flush()
    job = pipe.read_blocking(jobs)
    def states():
        out = []
        for pid in job["others"]:
            with open(f"/proc/{pid}/stat") as f:
                out.append(f.read().rsplit(")", 1)[1].split()[0])
        return out
    answers.write(pipe.encode({"exclusive": True})); answers.flush()
    paused = pipe.read_blocking(jobs)["paused"]
    during = states()
    answers.write(pipe.encode({"exclusive": False})); answers.flush()
    pipe.read_blocking(jobs)
    answers.write(pipe.encode({"ok": True, "paused": paused, "during": during, "after": states()})); answers.flush()
''')


class FakeRunner(RunnerProcess):
    async def start(self) -> None:
        from nsd.worker import pipe

        self.dirs.fresh()
        script = self.dirs.scratch / "fake_runner.py"
        script.write_text(FAKE_RUNNER)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            start_new_session=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        self._ready = asyncio.ensure_future(pipe.read_async(self.proc.stdout))


@pytest.mark.slow
async def test_a_measuring_runner_has_the_workers_machine_to_itself(tmp_path):
    """The neighbour is a real runner in its real sandbox (bubblewrap puts it in a session of its own, below
    bwrap): every one of its processes is stopped while the other one times, and runs again after."""
    from nsd.worker.sandbox import runner_layout
    from nsd.worker.slots import RunnerSetup, process_tree

    setup = RunnerSetup(runner_layout(True, [], [tmp_path / "cache"], tmp_path / "home"), tmp_path / "cache" / "blobs",
                        tmp_path / "cache" / "numba")
    pool = SlotPool([sorted(os.sched_getaffinity(0))[0]], 1, tmp_path / "cache", "w", setup)
    neighbour = pool.slots[0].runner
    measuring = FakeRunner([0], tmp_path / "fake", tmp_path / "fake.log", setup, pool._exclusive)
    try:
        await asyncio.wait_for(neighbour.ready(), 120)
        others = process_tree(neighbour.proc.pid)
        assert len(others) >= 2 or setup.layout is None  # bwrap and the runner below it
        job = {"task_id": "t", "spec": {"model": {}, "recipe": {"kind": "feature-extraction"}}, "others": others}
        answer = await asyncio.wait_for(measuring.run(job), 60)
        assert answer["ok"] and answer["paused"] == 1
        assert set(answer["during"]) == {"T"}, answer  # all of them stopped while it measured
        assert "T" not in answer["after"]  # and running again after
    finally:
        await measuring.stop(kill=True)
        await pool.close()
    assert not pool._measuring.locked() and pool._paused == []


@pytest.mark.slow
async def test_an_objective_on_a_recipe_without_benchmark_inputs_is_one_clear_line(client, start_workers):
    await start_workers(1)
    result = await client.result(await client.submit(digits_spec(objective="latency")), wait=True)
    assert result["state"] == "failed"
    assert result["error"].splitlines()[0] == (
        "evaluating the FP32 baseline failed: ValueError: tuning.objective = 'latency' ranks trials by deployment "
        "figures, but the python recipe defines no benchmark_inputs() (one batch's positional inputs)")
