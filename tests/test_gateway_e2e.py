"""Both doors end to end: real broker, real worker, real INC on the digits example, the recipe and model
uploaded through the door; the answer must equal the Python client's (the CLI's) for the same spec."""

from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
import zipfile

import pytest

from nsd.client.view import apply_event
from tests.conftest import digits_spec
from tests.gateway_fixtures import AUTH, TOKEN, files_under, grpc_upload_digits, read_sse, upload_digits

pytestmark = pytest.mark.slow
pytest.importorskip("fastapi")
os.environ.setdefault("LOGLEVEL", "WARNING")


def answer(task: dict) -> dict:
    """What a task concluded, without ids and times: equal for the same spec through any door."""
    return {"state": task["state"], "met_goal": task["met_goal"], "baseline": task["baseline"],
            "winner": task["winner"], "trials": [(t["label"], t["state"], t["metric"]) for t in task["trials"]]}


def assert_no_gap_no_repeat(events: list[dict]) -> dict:
    """Seqs only grow; each event after the first follows its predecessor by one, unless it is a snapshot
    (which stands in for what was missed). Returns the task view the events fold into."""
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)), seqs
    assert events[0]["kind"] == "snapshot"
    for before, event in zip(events, events[1:]):
        assert event["kind"] == "snapshot" or event["seq"] == before["seq"] + 1, (before, event)
    task = None
    for event in events:
        task = apply_event(task, event)
    return task



def load_and_score(spec: dict, folder) -> float:
    from neural_compressor.torch.quantization import load

    from nsd.quant.recipes import load_recipe

    recipe = load_recipe(spec)
    return recipe.evaluate(load(str(folder), original_model=recipe.load_model()))


async def test_rest_end_to_end_with_sse_resume_matches_the_python_client(http, client, start_workers, tmp_path):
    await start_workers(1)
    reference = await client.result(await client.submit(digits_spec()), wait=True)
    assert reference["state"] == "done" and reference["winner"] is not None

    spec = await upload_digits(http)
    spec["tuning"]["cache"] = False  # run it for real: the same blobs would be answered from the metric cache
    created = await http.post("/v1/tasks", json=spec)
    assert created.status_code == 201, created.text
    task_id = created.json()["task_id"]
    first = await read_sse(http, task_id, stop_after=3)  # then the client goes away mid-task
    rest = await read_sse(http, task_id, last_event_id=first[-1]["seq"])
    assert rest, "a resumed stream must carry the task to its end"
    folded = assert_no_gap_no_repeat(first + rest)
    result = (await http.get(f"/v1/tasks/{task_id}")).json()
    assert folded["state"] == result["state"] == "done"
    assert [(t["state"], t["metric"]) for t in folded["trials"]] == [(t["state"], t["metric"]) for t in result["trials"]]
    assert answer(result) == answer(reference)

    async with http.stream("GET", f"/v1/tasks/{task_id}/artifact") as got:
        assert got.status_code == 200 and got.headers["content-type"] == "application/x-tar"
        with open(tmp_path / "artifact.tar", "wb") as out:
            async for chunk in got.aiter_bytes():
                out.write(chunk)
    with tarfile.open(tmp_path / "artifact.tar") as tar:
        tar.extractall(tmp_path / "rest", filter="data")
    await client.fetch(task_id, tmp_path / "fetched")  # the tar holds what `nsd fetch` writes, byte for byte
    assert files_under(tmp_path / "rest") == files_under(tmp_path / "fetched")
    assert {"model", "result.json", "README.md"} <= set(files_under(tmp_path / "rest"))
    assert await asyncio.to_thread(load_and_score, digits_spec(), tmp_path / "rest" / "model") == result["winner"]["metric"]

    # The old service's paths over the same task.
    status = (await http.get(f"/task/status/{task_id}")).json()
    assert status["status"] == "done" and status["optimized_result"]["accuracy"] == result["winner"]["metric"]
    zipped = await http.get(status["result_path"])
    assert zipped.status_code == 200 and zipped.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(zipped.content)) as zf, tarfile.open(tmp_path / "artifact.tar") as tf:
        assert sorted(n.rstrip("/") for n in zf.namelist()) == sorted(m.name for m in tf.getmembers())
    log = await http.get(f"/task/log/{task_id}")
    expected = await client.logs(task_id)
    assert log.status_code == 200 and log.text.count("==> ") == len(expected)
    assert all(entry["text"] in log.text for entry in expected)


async def test_old_screen_websocket_streams_progress_lines_to_the_end(gateway, client, start_workers):
    from websockets.asyncio.client import connect

    await start_workers(1)
    task_id = await client.submit(digits_spec())
    url = gateway.endpoints["http"].replace("http://", "ws://") + f"/task/screen/{task_id}"
    lines = []
    async with connect(url, additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        async for line in ws:
            lines.append(line)
    assert all(line.startswith(task_id) for line in lines)
    assert "done" in lines[-1] and len(lines) > 3


async def test_grpc_end_to_end_with_watch_resume_matches_the_python_client(gateway, client, start_workers, tmp_path):
    from nsd.gateway import nsd_pb2 as pb
    from nsd.gateway import nsd_pb2_grpc
    import grpc

    await start_workers(1)
    reference = await client.result(await client.submit(digits_spec()), wait=True)
    async with grpc.aio.insecure_channel(gateway.endpoints["grpc"]) as channel:
        stub = nsd_pb2_grpc.NsdStub(channel)
        spec = await grpc_upload_digits(stub)
        spec["tuning"]["cache"] = False  # run it for real: the same blobs would be answered from the cache
        task_id = (await stub.Submit(pb.SubmitRequest(spec_json=json.dumps(spec)), metadata=AUTH)).task_id
        watch = stub.Watch(pb.WatchRequest(task_id=task_id), metadata=AUTH)
        first = [json.loads((await watch.read()).json) for _ in range(3)]
        watch.cancel()  # gone mid-task; back with the last seq it saw
        rest = [json.loads(e.json) async for e in stub.Watch(pb.WatchRequest(task_id=task_id, after_seq=first[-1]["seq"]),
                                                              metadata=AUTH)]
        folded = assert_no_gap_no_repeat(first + rest)
        result = json.loads((await stub.Get(pb.TaskRequest(task_id=task_id), metadata=AUTH)).json)
        assert folded["state"] == result["state"] == "done"
        assert answer(result) == answer(reference)
        name = None
        with open(tmp_path / "artifact.tar", "wb") as out:
            async for chunk in stub.Fetch(pb.TaskRequest(task_id=task_id), metadata=AUTH):
                name = name or chunk.name
                out.write(chunk.data)
    assert name == f"{task_id}.tar"
    with tarfile.open(tmp_path / "artifact.tar") as tar:
        tar.extractall(tmp_path / "grpc", filter="data")
    assert await asyncio.to_thread(load_and_score, digits_spec(), tmp_path / "grpc" / "model") == result["winner"]["metric"]
