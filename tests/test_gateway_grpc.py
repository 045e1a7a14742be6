"""The gRPC door against a real broker: every RPC, its status codes, and every way in being refused."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest

from tests.conftest import DIGITS, digits_spec
from tests.gateway_fixtures import AUTH, LIMITS, TOKEN, grpc_upload_digits, pb, upload_parts, without_page

grpc = pytest.importorskip("grpc")


@pytest.fixture
async def stub(gateway):
    from nsd.gateway import nsd_pb2_grpc

    async with grpc.aio.insecure_channel(gateway.endpoints["grpc"]) as channel:
        yield nsd_pb2_grpc.NsdStub(channel)


async def test_ping(stub, broker):
    reply = await stub.Ping(pb().PingRequest(), metadata=AUTH)
    assert reply.broker == broker.endpoints["clients"] and reply.gateway_version


async def test_upload_gives_the_python_clients_ref(stub, client, tmp_path):
    ref = (await stub.Upload(upload_parts("recipe.py", (DIGITS / "recipe.py").read_bytes()), metadata=AUTH)).ref
    assert ref == await client.upload(DIGITS / "recipe.py") and client.uploaded_bytes == 0
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "a.txt").write_text("a")
    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w") as tar:
        tar.add(folder, arcname=".")
    ref = (await stub.Upload(upload_parts("model", body.getvalue(), tar=True), metadata=AUTH)).ref
    assert ref == await client.upload(folder)


async def test_submit_get_list_cancel_logs_cluster(stub, client):
    spec = await grpc_upload_digits(stub)
    task_id = (await stub.Submit(pb().SubmitRequest(spec_json=json.dumps(spec)), metadata=AUTH)).task_id
    got = await stub.Get(pb().TaskRequest(task_id=task_id), metadata=AUTH)
    assert without_page(json.loads(got.json)) == await client.result(task_id) and got.state == "queued"
    listed = await stub.List(pb().ListRequest(), metadata=AUTH)
    assert [t.task_id for t in listed.tasks] == [task_id]
    logs = await stub.Logs(pb().LogsRequest(task_id=task_id), metadata=AUTH)
    assert len(logs.logs) == len(await client.logs(task_id))
    cancelled = await stub.Cancel(pb().TaskRequest(task_id=task_id), metadata=AUTH)
    assert cancelled.state == "cancelled" == (await client.status(task_id))["state"]
    cluster = await stub.Cluster(pb().ClusterRequest(), metadata=AUTH)
    assert json.loads(cluster.workers_json) == await client.cluster()
    with pytest.raises(grpc.aio.AioRpcError) as no_model:
        async for _ in stub.Fetch(pb().TaskRequest(task_id=task_id), metadata=AUTH):
            pass
    assert no_model.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_watch_resumes_after_a_seq_without_repeats(stub, client):
    spec = digits_spec()
    spec["model"]["shared"] = True
    task_id = await client.submit(spec)
    stream = stub.Watch(pb().WatchRequest(task_id=task_id), metadata=AUTH)
    first = await stream.read()
    stream.cancel()
    assert first.kind == "snapshot" and json.loads(first.json)["task"]["state"] == "queued"
    await client.cancel(task_id)
    seq = (await client.status(task_id))["seq"]
    again = [e async for e in stub.Watch(pb().WatchRequest(task_id=task_id, after_seq=first.seq), metadata=AUTH)]
    assert [(e.kind, e.seq) for e in again] == [("snapshot", seq)]
    assert [e async for e in stub.Watch(pb().WatchRequest(task_id=task_id, after_seq=seq), metadata=AUTH)] == []


async def test_invalid_spec_is_invalid_argument_with_every_problem(stub):
    from nsd.spec import SpecError, validate

    bad = digits_spec(tolerable_loss=-1, criterion="sideways")
    with pytest.raises(SpecError) as cli:
        validate(bad)
    for spec_json in (json.dumps(bad), "{nope"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Submit(pb().SubmitRequest(spec_json=spec_json), metadata=AUTH)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Submit(pb().SubmitRequest(spec_json=json.dumps(bad)), metadata=AUTH)
    assert refused.value.details().splitlines() == cli.value.problems


async def test_unknown_task_is_not_found_on_every_rpc(stub):
    request = pb().TaskRequest(task_id="nosuch")
    for call in (stub.Get(request, metadata=AUTH), stub.Cancel(request, metadata=AUTH),
                 stub.Logs(pb().LogsRequest(task_id="nosuch"), metadata=AUTH)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND and "no task" in refused.value.details()
    for stream in (stub.Watch(pb().WatchRequest(task_id="nosuch"), metadata=AUTH), stub.Fetch(request, metadata=AUTH)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stream:
                pass
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong-token-0123456789"),),
                                      (("authorization", TOKEN),)])
async def test_missing_or_wrong_token_is_unauthenticated_on_every_kind_of_rpc(stub, metadata):
    calls = [lambda: stub.Ping(pb().PingRequest(), metadata=metadata),
             lambda: stub.Submit(pb().SubmitRequest(spec_json="{}"), metadata=metadata),
             lambda: stub.Upload(upload_parts("x.py", b"x"), metadata=metadata)]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for stream in (stub.Watch(pb().WatchRequest(task_id="x"), metadata=metadata),
                   stub.Fetch(pb().TaskRequest(task_id="x"), metadata=metadata)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stream:
                pass
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_oversize_upload_is_resource_exhausted_and_nothing_is_stored(stub, gateway):
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Upload(upload_parts("big.bin", b"x" * (LIMITS["max_upload"] + 1), chunk=1 << 20), metadata=AUTH)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert gateway.gateway.uploaded_bytes == 0


async def test_upload_not_matching_its_sha256_is_refused_and_nothing_is_stored(stub, client, tmp_path):
    data = b"print('tampered')\n"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Upload(upload_parts("r.py", data, sha256=hashlib.sha256(b"original").hexdigest()), metadata=AUTH)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sha256" in refused.value.details()
    (tmp_path / "r.py").write_bytes(data)
    await client.upload(tmp_path / "r.py")
    assert client.uploaded_bytes > 0  # the broker did not have it


async def test_hostile_uploads_are_invalid_argument(stub, gateway):
    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w") as tar:
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
        tar.addfile(link)
    cases = [upload_parts("model", body.getvalue(), tar=True), upload_parts("../x", b"x"),
             iter([pb().UploadPart(data=b"no header first")]),
             iter([pb().UploadPart(header=pb().UploadHeader(name="a")), pb().UploadPart(header=pb().UploadHeader(name="b"))])]
    for parts in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Upload(parts, metadata=AUTH)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert gateway.gateway.uploaded_bytes == 0
