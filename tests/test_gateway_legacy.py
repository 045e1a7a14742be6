"""The old Neural Solution paths (fast checks; the e2e test follows a real task through them)."""

from __future__ import annotations

import pytest

from tests.conftest import digits_spec, wait_for
from tests.gateway_fixtures import TOKEN

pytest.importorskip("fastapi")


async def test_ping_and_cluster(http, client):
    assert (await http.get("/ping")).json()["status"] == "Healthy"
    assert (await http.get("/cluster")).json() == {"Cluster info": await client.cluster()}


async def test_status_of_a_queued_then_cancelled_task(http, client):
    spec = digits_spec()
    spec["model"]["shared"] = True
    task_id = await client.submit(spec)
    assert (await http.get(f"/task/status/{task_id}")).json() == {"status": "queued", "task_id": task_id}
    await client.cancel(task_id)
    status = (await http.get(f"/task/status/{task_id}")).json()
    assert status["status"] == "cancelled" and "result_path" not in status
    assert (await http.get(f"/download/{task_id}")).status_code == 409


@pytest.mark.parametrize("path", ["/task/status/nosuch", "/task/log/nosuch", "/download/nosuch"])
async def test_unknown_task_is_404(http, path):
    assert (await http.get(path)).status_code == 404


async def test_screen_websocket_refuses_a_missing_token_and_an_unknown_task(gateway, client):
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosedError, InvalidStatus

    base = gateway.endpoints["http"].replace("http://", "ws://")
    task_id = await client.submit({**digits_spec(), "model": {"path": digits_spec()["model"]["path"], "shared": True}})
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{base}/task/screen/{task_id}", additional_headers=headers):
                pass
        assert refused.value.response.status_code == 403
    async with connect(f"{base}/task/screen/nosuch", additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        with pytest.raises(ConnectionClosedError) as closed:
            await ws.recv()
    assert closed.value.rcvd.code == 1008 and "no task" in closed.value.rcvd.reason
    async with connect(f"{base}/task/screen/{task_id}", additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        assert (await ws.recv()).startswith(task_id)  # the queued task's progress line


async def test_screen_stops_following_the_task_when_its_client_leaves(gateway, client):
    """Issue 19, item 7: the old handler kept polling the broker for a client that had gone."""
    from websockets.asyncio.client import connect

    task_id = await client.submit({**digits_spec(), "model": {"path": digits_spec()["model"]["path"], "shared": True}})
    base = gateway.endpoints["http"].replace("http://", "ws://")
    async with connect(f"{base}/task/screen/{task_id}", additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        assert (await ws.recv()).startswith(task_id)
        assert gateway.feeds.streams["alice"] == 1 and len(gateway.feeds.feeds) == 1

    async def released():
        return not gateway.feeds.feeds and not gateway.feeds.streams
    await wait_for(released, 30)  # the task (queued, quiet) is no longer followed for anyone
