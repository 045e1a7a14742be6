"""The metric cache (nothing computed twice) and the winner kept from its own trial (no second quantization)."""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest

from nsd.broker import metric_cache as mc
from nsd.broker.store import Store
from nsd.spec import TaskSpec
from tests.conftest import DIGITS, digits_spec

os.environ.setdefault("LOGLEVEL", "WARNING")

SHA = {name: digit * 64 for name, digit in (("model", "a"), ("recipe", "b"), ("data", "c"), ("other", "d"))}
VERSIONS = {"nsd": "0.1.0", "neural-compressor-pt": "3.10", "torch": "2.13.0", "transformers": "4.57.6"}


def blob_spec(**changes) -> TaskSpec:
    spec = {"model": {"path": f"nsd-blob:{SHA['model']}/model.pt", "shared": False},
            "recipe": {"kind": "python", "file": f"nsd-blob:{SHA['recipe']}/recipe.py", "data": None, "metric": None,
                       "eval_samples": 256},
            "tuning": {"config_set": [{"rtn": {"bits": [2, 4]}}], "max_trials": 100, "tolerable_loss": 0.01,
                       "cache": True}}
    for path, value in changes.items():
        section, key = path.split(".")
        spec[section] = {**spec[section], key: value}
    return TaskSpec.from_dict(spec)  # as the broker holds it (a plain path, refused at submit, is kept here)


def keys(spec: TaskSpec, versions: dict = VERSIONS, config: dict | None = None, fallback=None) -> tuple:
    basis = mc.task_basis(spec, versions)
    return (mc.plan_key(basis, spec.tuning), mc.trial_key(basis, config or {"rtn": {"bits": 4}}, fallback))


def test_keys_change_with_every_input_and_only_with_them():
    base = keys(blob_spec())
    assert keys(blob_spec(**{"tuning.tolerable_loss": 0.5, "tuning.max_attempts": 9})) == base  # not inputs
    for changed in (keys(blob_spec(**{"model.path": f"nsd-blob:{SHA['other']}/model.pt"})),
                    keys(blob_spec(**{"recipe.file": f"nsd-blob:{SHA['other']}/recipe.py"})),
                    keys(blob_spec(**{"recipe.data": f"nsd-blob:{SHA['data']}/data.txt"})),
                    keys(blob_spec(**{"recipe.eval_samples": 128})),
                    keys(blob_spec(), {**VERSIONS, "torch": "2.14.0"}),
                    keys(blob_spec(), {**VERSIONS, "neural-compressor-pt": "3.11"}),
                    keys(blob_spec(), {**VERSIONS, "nsd": "0.2.0"})):
        assert changed[0] != base[0] and changed[1] != base[1]
    assert keys(blob_spec(), config={"rtn": {"bits": 8}})[1] != base[1]
    assert keys(blob_spec(), fallback=["fc1"])[1] != base[1]  # fallback ops are part of a trial's config
    assert keys(blob_spec(**{"tuning.config_set": [{"rtn": {"bits": 8}}]}))[0] != base[0]
    # The file names inside blob references do not matter, their content does.
    assert keys(blob_spec(**{"model.path": f"nsd-blob:{SHA['model']}/renamed.pt"})) == base


def test_only_blob_inputs_with_known_versions_are_cached():
    assert mc.task_basis(blob_spec(), VERSIONS) is not None
    assert mc.task_basis(blob_spec(**{"model.shared": True}), VERSIONS) is None
    assert mc.task_basis(blob_spec(**{"model.path": "/models/m.pt"}), VERSIONS) is None  # a plain path
    assert mc.task_basis(blob_spec(**{"tuning.cache": False}), VERSIONS) is None
    assert mc.task_basis(blob_spec(), None) is None


def task_of(owner: str, task_id: str = "t1") -> SimpleNamespace:
    return SimpleNamespace(id=task_id, owner=owner, spec=blob_spec())


def worker_of(wid: str = "w1", trusted: bool = False, versions: dict = VERSIONS) -> SimpleNamespace:
    return SimpleNamespace(id=wid, trusted=trusted, versions=versions)


def test_the_cache_table_survives_a_restart(tmp_path):
    store = Store(tmp_path / "db")
    cache = mc.MetricCache(store, lambda: 1.0)
    cache.put_trial(task_of("alice"), worker_of(), {"rtn": {"bits": 4}}, None, 0.93)
    store.close()
    cache = mc.MetricCache(Store(tmp_path / "db"), lambda: 2.0)
    assert cache.get_trial(task_of("alice"), VERSIONS, {"rtn": {"bits": 4}}) == {"metric": 0.93, "bound": None}
    assert cache.get_trial(task_of("alice"), {**VERSIONS, "torch": "2.14.0"}, {"rtn": {"bits": 4}}) is None
    cache.store.close()


def test_entries_are_per_tenant_unless_shared_and_produced_by_a_trusted_worker(tmp_path):
    """Issue 16 item 4 / issue 15 item 2: a tenant's entry is never another's answer; with share_cache, only
    a trusted worker's results are shared; the versions a worker reports buy it no trust."""
    bits4 = {"rtn": {"bits": 4}}
    for share in (False, True):
        store = Store(tmp_path / f"db-{share}")
        cache = mc.MetricCache(store, lambda: 1.0, share=share)
        cache.put_trial(task_of("alice"), worker_of("evil"), bits4, None, 0.99)  # an untrusted worker
        assert cache.get_trial(task_of("alice", "t2"), VERSIONS, bits4) == {"metric": 0.99, "bound": None}
        assert cache.get_trial(task_of("bob"), VERSIONS, bits4) is None  # neither shared nor bob's
        cache.put_plan(task_of("carol"), worker_of("node1", trusted=True), 0.9, [{"config": bits4}])
        assert (cache.get_plan(task_of("dave"), VERSIONS) is not None) is share
        assert store.cache_purge(worker="node1") == (2 if share else 1)  # both scopes of a trusted result
        assert cache.get_plan(task_of("carol"), VERSIONS) is None
        store.close()


def jobs_run(worker, task_id: str) -> list[str]:
    """The jobs a worker's runners ran for a task (one log file each: plan, baseline, <index>-a<attempt>, save)."""
    folder = worker.cache_dir / "logs" / task_id
    return sorted(p.name.rsplit("-a", 1)[0] if p.name[0].isdigit() else p.name.split("-")[0]
                  for p in folder.glob("*.log")) if folder.is_dir() else []


def answer(result: dict) -> tuple:
    return (result["state"], result["met_goal"], result["baseline"], result["winner"],
            [(t["index"], t["state"], t["metric"]) for t in result["trials"] if t["state"] != "cancelled"])


@pytest.mark.slow
async def test_a_retune_with_another_tolerance_runs_only_what_the_cache_cannot_decide(client, start_workers):
    (worker,) = await start_workers(1)
    first = await client.result(await client.submit(digits_spec()), wait=True)  # tolerance 0.5 %: trial 2 wins
    assert first["winner"]["index"] == 2
    assert jobs_run(worker, first["task_id"]) == ["0", "1", "2", "baseline", "plan", "save", "verify"]
    assert not any(t["cached"] for t in first["trials"]) and first["trials"][0]["stopped_early"]
    # A stricter goal: the 2-bit trials' intervals (below the 0.5 % goal, so below this one too) and trial 2's
    # metric are known: none of them runs again.
    strict = await client.result(await client.submit(digits_spec(tolerable_loss=0.0001)), wait=True)
    assert all(t["cached"] for t in strict["trials"][:3])
    assert not {"0", "1", "2", "baseline", "plan"} & set(jobs_run(worker, strict["task_id"]))
    # 15 %: trial 1 (0.83) passes. The 2-bit trials stopped below 0.5 % loss, which does not say whether they
    # pass 15 %: they run again (lazily: trial 0 stops once it cannot pass); the rest is known. The new
    # winner's model is saved and verified.
    retune = await client.result(await client.submit(digits_spec(tolerable_loss=0.15)), wait=True)
    assert jobs_run(worker, retune["task_id"]) == ["0", "1", "save", "verify"] and retune["winner"]["index"] == 1
    cold = await client.result(await client.submit(digits_spec(tolerable_loss=0.15, cache=False)), wait=True)
    assert jobs_run(worker, cold["task_id"]) == ["0", "1", "baseline", "plan", "save", "verify"]
    assert answer(retune) == answer(cold)
    # The same task once more: trial 0's interval now decides, trial 1's metric and the artifact are known.
    again = await client.result(await client.submit(digits_spec(tolerable_loss=0.15)), wait=True)
    assert jobs_run(worker, again["task_id"]) == [] and answer(again) == answer(cold)
    assert again["artifact"] == retune["artifact"]


@pytest.mark.slow
async def test_a_changed_recipe_misses_the_cache(client, start_workers, tmp_path):
    (worker,) = await start_workers(1)
    first = await client.result(await client.submit(digits_spec()), wait=True)
    shutil.copy(DIGITS / "model.pt", tmp_path / "model.pt")
    (tmp_path / "recipe.py").write_text((DIGITS / "recipe.py").read_text() + "\n# another recipe file\n")
    spec = digits_spec()
    spec["model"]["path"], spec["recipe"]["file"] = str(tmp_path / "model.pt"), str(tmp_path / "recipe.py")
    changed = await client.result(await client.submit(spec), wait=True)
    assert jobs_run(worker, changed["task_id"]) == ["0", "1", "2", "baseline", "plan", "save", "verify"]
    assert not any(t["cached"] for t in changed["trials"]) and answer(changed) == answer(first)


@pytest.mark.slow
async def test_the_save_job_uploads_the_winners_kept_model_without_quantizing_again(client, start_workers,
                                                                                   tmp_path):
    from neural_compressor.torch.quantization import load

    from nsd.quant.recipes import load_recipe

    spec = digits_spec(cache=False)
    (worker,) = await start_workers(1)
    result = await client.result(await client.submit(spec), wait=True)
    assert result["winner"]["index"] == 2 and result["error"] is None
    (save_log,) = await client.logs(result["task_id"], "save")
    assert "reused the model kept by trial 2 (not quantized again)" in save_log["text"]
    assert "quantized trial" not in save_log["text"]
    assert not (worker.cache_dir / "kept" / result["task_id"]).exists()  # discarded once saved
    path = await client.fetch(result["task_id"], tmp_path / "out")
    recipe = load_recipe(spec)
    assert recipe.evaluate(load(str(path), original_model=recipe.load_model())) == result["winner"]["metric"]
