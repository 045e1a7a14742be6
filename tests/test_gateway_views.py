"""Bounded views (issue 15, attack 7) and the artifact (issue 19, item 2): a task's trials come in pages
through REST and gRPC, whatever their number; the artifact is exactly the folder `nsd fetch` writes,
as a tar (REST, gRPC) and as the old /download zip."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import pytest

from nsd.protocol import Cmd
from nsd.transfer import packed
from tests.conftest import wait_for
from tests.gateway_fixtures import AUTH, files_under
from tests.peers import ScriptedWorker, metrics_answer, plan_then_hold, spec

pytest.importorskip("fastapi")
grpc = pytest.importorskip("grpc")


async def planned_task(client, broker, n: int) -> tuple[str, ScriptedWorker]:
    worker = await ScriptedWorker(broker.endpoints["workers"], "w-pages", answer=plan_then_hold(n)).start()
    task_id = await client.submit(spec(config_set=[{"rtn": {"bits": list(range(n))}}], max_trials=n))

    async def planned():
        return (await client.status(task_id))["state"] == "tuning"
    await wait_for(planned, 60)
    return task_id, worker


async def test_rest_and_grpc_page_a_task_of_many_trials(http, gateway, client, broker):
    from nsd.gateway import nsd_pb2 as pb
    from nsd.gateway import nsd_pb2_grpc

    task_id, worker = await planned_task(client, broker, 2500)
    try:
        first = (await http.get(f"/v1/tasks/{task_id}")).json()
        assert first["trials_page"] == {"offset": 0, "limit": 1000, "total": 2500}
        assert [t["index"] for t in first["trials"]] == list(range(1000))
        last = (await http.get(f"/v1/tasks/{task_id}", params={"offset": 2000, "limit": 1000})).json()
        assert [t["index"] for t in last["trials"]] == list(range(2000, 2500))
        assert last["trials_page"] == {"offset": 2000, "limit": 1000, "total": 2500}
        none = (await http.get(f"/v1/tasks/{task_id}", params={"limit": 0})).json()
        assert none["trials"] == [] and none["trials_page"]["total"] == 2500 and none["state"] == "tuning"
        assert (await http.get(f"/v1/tasks/{task_id}", params={"limit": 1001})).status_code == 422
        assert (await http.get(f"/v1/tasks/{task_id}", params={"offset": -1})).status_code == 422
        async with grpc.aio.insecure_channel(gateway.endpoints["grpc"]) as channel:
            stub = nsd_pb2_grpc.NsdStub(channel)
            page = json.loads((await stub.Get(pb.TaskRequest(task_id=task_id, offset=1000, limit=10), metadata=AUTH)).json)
            assert [t["index"] for t in page["trials"]] == list(range(1000, 1010))
            assert page["trials_page"] == {"offset": 1000, "limit": 10, "total": 2500}
            default = json.loads((await stub.Get(pb.TaskRequest(task_id=task_id), metadata=AUTH)).json)
            assert len(default["trials"]) == 1000
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Get(pb.TaskRequest(task_id=task_id, limit=5000), metadata=AUTH)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit" in refused.value.details()
        assert (await http.get(f"/task/status/{task_id}")).json()["status"] == "tuning"  # the old path still reads it
    finally:
        await worker.stop()


class SavingWorker(ScriptedWorker):
    """Plans and scores like its parent; its save job stores a real INC-like folder (packed as nsd packs
    one, not the parent's stand-in bytes) and names it, as a worker that saved that folder does."""

    artifact_sha: str = ""
    artifact_data: bytes = b""

    def _finish(self, key, job) -> None:
        if job["kind"] == "save" and key in self.running:
            self.send(Cmd.STORE, {"sha256": self.artifact_sha, "offset": 0, "size": len(self.artifact_data),
                                  "data": self.artifact_data})  # a worker may name only bytes it stored
            self.result(key, {"ok": True, "artifact": self.artifact_sha})
            return
        super()._finish(key, job)


async def done_with_artifact(client, broker, tmp_path) -> tuple[str, SavingWorker]:
    model = tmp_path / "saved" / "model"  # the name every artifact has (the broker names it `model`)
    (model / "sub").mkdir(parents=True)
    (model / "qconfig.json").write_text('{"rtn": {"bits": 4}}')
    (model / "model.pt").write_bytes(bytes(range(256)) * 5000)
    (model / "sub" / "nsd.json").write_text('{"trial": 1}')
    worker = SavingWorker(broker.endpoints["workers"], "w-save", answer=metrics_answer({i: 0.99 for i in range(6)}))
    with packed(model) as blob:
        blob.file.seek(0)
        worker.artifact_sha, worker.artifact_data = blob.sha256, blob.file.read()
    await worker.start()
    task_id = await client.submit(spec())

    async def saved():
        task = await client.status(task_id)
        return task["state"] == "done" and task["artifact"]
    await wait_for(saved, 60)
    return task_id, worker



async def test_the_artifact_is_the_folder_nsd_fetch_writes(http, gateway, client, broker, tmp_path):
    from nsd.gateway import nsd_pb2 as pb
    from nsd.gateway import nsd_pb2_grpc

    task_id, worker = await done_with_artifact(client, broker, tmp_path)
    try:
        await client.fetch(task_id, tmp_path / "fetched")
        fetched = files_under(tmp_path / "fetched")
        assert {"model", "model/model.pt", "result.json", "README.md"} <= set(fetched)

        answer = await http.get(f"/v1/tasks/{task_id}/artifact")
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/x-tar"
        assert int(answer.headers["content-length"]) == len(answer.content)
        with tarfile.open(fileobj=io.BytesIO(answer.content)) as tar:
            members = {m.name: (tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()}
        assert members == fetched  # the same members, byte for byte
        again = await http.get(f"/v1/tasks/{task_id}/artifact")
        assert again.content == answer.content  # and the same tar each time (sorted, zero times and owners)

        zipped = await http.get(f"/download/{task_id}")
        assert zipped.status_code == 200 and zipped.headers["content-type"] == "application/zip"
        with zipfile.ZipFile(io.BytesIO(zipped.content)) as zf:
            assert {n.rstrip("/"): (None if n.endswith("/") else zf.read(n)) for n in zf.namelist()} == fetched

        async with grpc.aio.insecure_channel(gateway.endpoints["grpc"]) as channel:
            chunks = [c async for c in nsd_pb2_grpc.NsdStub(channel).Fetch(pb.TaskRequest(task_id=task_id), metadata=AUTH)]
        assert chunks[0].name == f"{task_id}.tar" and chunks[0].size == len(answer.content)
        assert b"".join(c.data for c in chunks) == answer.content
    finally:
        await worker.stop()
