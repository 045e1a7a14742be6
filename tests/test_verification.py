"""The winner's model is checked before it is handed out (issue 15 item 2): a worker that reports a false
winning metric and saves a model is caught by a verify job on another worker; the task fails loudly, the
model is never handed out, and the cache entries that could carry the lie are purged."""

from __future__ import annotations

import os

from nsd.protocol import Cmd
from tests.conftest import wait_for
from tests.peers import ScriptedWorker, count_assigned, done, metrics_answer, spec

VERSIONS = {"nsd": "0.1.0", "neural-compressor-pt": "3.10", "torch": "2.13.0"}  # for the metric cache
TRUTH = {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5, 4: 0.5, 5: 0.5}  # no config keeps the accuracy...
LIE = {**TRUTH, 1: 0.99}  # ...but a worker says trial 1 does


def with_model(tmp_path) -> dict:
    path = tmp_path / "model.bin"
    path.write_bytes(os.urandom(512))
    return {**spec(), "model": {"path": str(path)}}


async def test_a_lying_winner_is_caught_by_another_worker_and_its_cache_entries_purged(broker, client, tmp_path):
    liar = await ScriptedWorker(broker.endpoints["workers"], "liar", slots=2, answer=metrics_answer(LIE),
                                delay_s=0.3, versions=VERSIONS).start()
    task_id = await client.submit(with_model(tmp_path))
    await wait_for(lambda: count_assigned(liar, "save", 1), 20)
    honest = await ScriptedWorker(broker.endpoints["workers"], "honest", answer=metrics_answer(TRUTH),
                                  versions=VERSIONS).start()
    try:
        task = await done(client, task_id)
        assert await count_assigned(honest, "verify", 1) and not any(a[2]["kind"] == "verify" for a in liar.assigned)
        assert task["state"] == "failed" and task["artifact"] is None
        assert "failed verification: worker honest measured 0.5, the winning trial reported 0.99" in task["error"]
        assert "cache entries" in task["error"] and "liar" in task["error"]
        assert broker.store.db.execute("SELECT COUNT(*) FROM cache WHERE worker = 'liar'").fetchone()[0] == 0
        # The same task again: nothing of the lie is reused (the plan and every trial run again).
        await liar.stop(bye=True)
        again = await done(client, await client.submit(with_model(tmp_path)))
        assert not any(t["cached"] for t in again["trials"]) and again["met_goal"] is False
    finally:
        if liar in ScriptedWorker.live:
            await liar.stop()
        await honest.stop()


class HoldsVerify(ScriptedWorker):
    """Answers everything but a verify job, which it holds."""

    def _finish(self, key, job):
        if job["kind"] != "verify":
            super()._finish(key, job)


async def test_a_saved_model_is_not_handed_out_before_it_is_verified(tenants, tmp_path):
    client = tenants.client("alice")
    worker = await HoldsVerify(tenants.broker.endpoints["workers"], "node1", slots=2, curve=tenants.keys("node1"),
                               answer=metrics_answer({0: 0.5, 1: 0.95, 2: 0.2, 3: 0.99, 4: 0.99, 5: 0.99})).start()
    try:
        task_id = await client.submit(with_model(tmp_path))
        await wait_for(lambda: count_assigned(worker, "verify", 1), 20)
        job = next(a for a in worker.assigned if a[2]["kind"] == "verify")
        candidate = job[2]["artifact"].split(":")[1].split("/")[0]
        task = await client.status(task_id)
        assert task["state"] == "finalizing" and task["artifact"] is None
        assert "no blob" in str(await _error(client.download(candidate, tmp_path / "early.tar")))
        worker.result(job[:2], {"ok": True, "metric": 0.95})
        task = await done(client, task_id)
        assert task["state"] == "done" and task["artifact"] == f"nsd-blob:{candidate}/model"
        await client.download(candidate, tmp_path / "now.tar")  # handed out once verified
    finally:
        await worker.stop()


async def test_a_verify_that_cannot_load_the_model_hands_nothing_out(broker, client, tmp_path):
    worker = await HoldsVerify(broker.endpoints["workers"], "w", slots=2,
                               answer=metrics_answer({0: 0.5, 1: 0.95, 2: 0.2, 3: 0.99, 4: 0.99, 5: 0.99})).start()
    try:
        task_id = await client.submit(with_model(tmp_path))
        await wait_for(lambda: count_assigned(worker, "verify", 1), 20)
        job = next(a for a in worker.assigned if a[2]["kind"] == "verify")
        worker.result(job[:2], {"ok": False, "error": "ValueError: not an INC save folder"})
        task = await done(client, task_id)
        assert task["state"] == "done" and task["artifact"] is None and task["winner"]["index"] == 1
        assert "could not be verified: ValueError: not an INC save folder" in task["error"]
    finally:
        await worker.stop()


async def _error(call):
    try:
        await call
    except Exception as exc:
        return exc
    raise AssertionError("no error")


def test_a_verify_job_names_a_blob_or_the_worker_refuses_it():
    from nsd.worker import checks
    from tests.peers import SPEC
    from nsd.spec import validate

    body = {"kind": "verify", "task_id": "0123456789ab", "spec": validate(SPEC, local_paths=True).to_dict(),
            "index": 1, "config": {"rtn": {"bits": 4}}, "fallback": []}
    body["spec"]["recipe"]["file"] = f"nsd-blob:{'a' * 64}/r.py"
    for artifact in (None, "/etc/passwd", "../model", f"nsd-blob:{'a' * 63}/model", 7):
        assert "verify job without a blob reference" in checks.job("0123456789ab/verify", {**body, "artifact": artifact})
    assert checks.job("0123456789ab/verify", {**body, "artifact": f"nsd-blob:{'b' * 64}/model"}) is None
    assert Cmd.ASSIGN
