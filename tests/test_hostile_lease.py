"""A worker that holds a lease is not trusted beyond it (issue 15 item 2): its plan must be the task's config
set expanded, it fetches only the blobs of the jobs it holds, stores only under a save lease, and its save
may name only the bytes it stored — never another blob the broker holds (someone's model)."""

from __future__ import annotations

import hashlib
import os

import pytest

from nsd.protocol import Cmd
from tests.conftest import wait_for
from tests.peers import ScriptedWorker, done, metrics_answer, plan_answer, spec


def planned(*bits) -> dict:
    return {"ok": True, "baseline": 1.0, "configs": [{"config": {"rtn": {"bits": b}}, "label": f"{b}"} for b in bits]}


@pytest.mark.parametrize("plan, why", [
    (planned(0, 1, 5000), "config 2 ({\"rtn\": {\"bits\": 5000}}) is not in the task's config set"),
    (planned(0, 1, 1), "config 2 is listed twice"),
    (planned(2, 1), "config 1 is out of order"),
    ({"ok": True, "baseline": 1.0, "configs": [{"config": {"gptq": {"bits": 1}}, "label": "x"}]}, "not in the task"),
    ({"ok": True, "baseline": 1.0, "configs": [{"config": {"rtn": {"bits": 0, "use_sym": s}}, "label": "x"}
                                               for s in (True, False)]}, "leaves to INC"),
])
async def test_a_plan_that_is_not_the_config_sets_expansion_fails_the_task_loudly(broker, client, plan, why):
    worker = await ScriptedWorker(broker.endpoints["workers"], "w", answer=lambda job: plan).start()
    try:
        task = await done(client, await client.submit(spec()))
        assert task["state"] == "failed" and "not the config set's expansion" in task["error"] and why in task["error"]
        assert task["trials"] == []
    finally:
        await worker.stop()


async def test_a_plan_longer_than_the_config_set_is_refused(broker, client):
    """100,000 configs from a worker for a set of three (the amplification of issue 15 item 2)."""
    small = {**spec(), "tuning": {**spec()["tuning"], "config_set": [{"rtn": {"bits": [0, 1, 2]}}]}}
    worker = await ScriptedWorker(broker.endpoints["workers"], "w", answer=lambda job: plan_answer(1.0, 4)).start()
    try:
        task = await done(client, await client.submit(small))
        assert task["state"] == "failed" and "the config set expands to 3" in task["error"]
    finally:
        await worker.stop()


async def test_a_worker_fetches_only_the_blobs_of_jobs_it_holds(broker, client, tmp_path):
    secret = tmp_path / "someone-elses.bin"
    secret.write_bytes(os.urandom(1000))
    other_ref = await client.upload(secret)
    other_sha = other_ref.split(":")[1].split("/")[0]
    worker = await ScriptedWorker(broker.endpoints["workers"], "w").start()  # holds whatever it gets
    try:
        mine = tmp_path / "mine.bin"
        mine.write_bytes(os.urandom(1000))
        task_id = await client.submit({**spec(), "model": {"path": str(mine)}})
        await wait_for(lambda: _true(worker.assigned), 10)
        job_sha = worker.assigned[0][2]["spec"]["model"]["path"].split(":")[1].split("/")[0]
        replies = await _fetch(worker, [other_sha, job_sha])
        assert replies[other_sha]["error"] == f"no blob {other_sha[:12]}… among the jobs you hold"
        assert "error" not in replies[job_sha] and replies[job_sha]["data"]
        assert task_id
    finally:
        await worker.stop()


async def test_a_save_may_name_only_the_bytes_its_worker_stored(broker, client, tmp_path):
    """The attack: a lease holder reports another blob the broker holds (here the task's own model, which
    could as well be another tenant's) as the artifact; nothing is handed out as the model. And a worker
    that holds no save job cannot store anything."""
    model = tmp_path / "model.bin"
    model.write_bytes(os.urandom(1000))
    outsider = await ScriptedWorker(broker.endpoints["workers"], "outsider").start()  # registered, holds nothing
    junk = b"not under a save lease"
    outsider.send(Cmd.STORE, {"sha256": hashlib.sha256(junk).hexdigest(), "offset": 0, "size": len(junk),
                              "data": junk})
    ack = await wait_for(lambda: _true(outsider.store_acks), 10)
    await outsider.stop(bye=True)
    assert ack[0]["error"] == "a worker stores blobs only for a save job it holds"
    assert not broker.blobs.has(hashlib.sha256(junk).hexdigest())
    liar = await LyingSaver(broker.endpoints["workers"], "liar", slots=2,
                            answer=metrics_answer({i: 0.99 for i in range(6)})).start()
    try:
        task = await done(client, await client.submit({**spec(), "model": {"path": str(model)}}))
        assert task["state"] == "done" and task["artifact"] is None and "did not upload" in task["error"]
        assert task["winner"]["index"] == 0  # the answer stands; only the model is not handed out
    finally:
        await liar.stop()


class LyingSaver(ScriptedWorker):
    """Runs plan and trials honestly; its save names the task's model blob as the artifact, uploading nothing."""

    def _finish(self, key, job):
        if job["kind"] == "save" and key in self.running:
            self.result(key, {"ok": True, "artifact": job["spec"]["model"]["path"].split(":")[1].split("/")[0]})
            return
        super()._finish(key, job)


async def _fetch(worker: ScriptedWorker, shas: list[str]) -> dict[str, dict]:
    """FETCH each blob's first chunk on the worker's connection; its CHUNK replies by hash."""
    for sha in shas:
        worker.send(Cmd.FETCH, {"sha256": sha, "offset": 0, "length": 1 << 20})
    await wait_for(lambda: _true(len(worker.chunks) >= len(shas)), 10)
    return {c["sha256"]: c for c in worker.chunks}


async def _true(value):
    return value
