"""Attacks a peer on the same host could make (issue "Trust nothing from the wire"), one test each, asserting
what a user needs: nothing written outside the state dir, forged results ignored and the true answer
kept, memory and connections bounded, an oversized request refused without stalling anyone else."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from nsd.client.api import AsyncClient, BrokerError
from nsd.protocol import BROKER_TO_WORKER, CLIENT_TO_BROKER, Cmd, ProtocolError, pack, unpack, JobRef
from tests.conftest import hello, hello_ok, wait_for
from tests.peers import ScriptedWorker, done, metrics_answer, plan_answer, spec



class Peer:
    """A raw DEALER that speaks the protocol as an attacker would: any identity, any field."""

    def __init__(self, endpoint: str, identity: bytes | None = None, curve=None):
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            self.sock.setsockopt(zmq.IDENTITY, identity)
        if curve is not None:
            curve.apply(self.sock)
        self.sock.connect(endpoint)

    async def send(self, cmd: Cmd, body: dict) -> None:
        await self.sock.send_multipart(pack(cmd, body))

    async def recv(self, allowed=BROKER_TO_WORKER | frozenset({Cmd.REPLY, Cmd.ERROR}), timeout: float = 5):
        frames = await asyncio.wait_for(self.sock.recv_multipart(), timeout)
        return unpack(frames, allowed)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime: what an attack must not change."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            st = path.lstat()
            out[str(path)] = (st.st_size, st.st_mtime_ns)
    return out


def ready(worker_id: str, **extra) -> dict:
    return {"worker_id": worker_id, "boot_id": "b", "host": "h", "cores": 1, "slots": 1, "version": 1,
            "running": [], "outbox": [], **extra}


async def test_blob_names_cannot_write_outside_the_state_dir(broker, tmp_path):
    """BLOB_PUT (client socket) and STORE (worker socket, unregistered) with path-like names: refused at
    the door; no file anywhere under the test's folder besides the broker's own is created or changed."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "name.keep").write_text("precious")
    before = {p: v for p, v in tree(tmp_path).items() if "/state/" not in p}
    client = Peer(broker.endpoints["clients"])
    worker = Peer(broker.endpoints["workers"], identity=b"intruder")
    try:
        for i, name in enumerate(["../../victim/name", str(victim / "name"), "/etc/passwd", "../" * 12 + "tmp/x",
                                  "A" * 64, "c" * 63]):
            await client.send(Cmd.BLOB_PUT, {"req": i, "sha256": name, "offset": 0, "size": 4, "data": b"evil"})
            reply = await client.recv()
            assert reply.cmd is Cmd.ERROR and "not a sha256" in reply.body["error"]
            await worker.send(Cmd.STORE, {"sha256": name, "offset": 0, "size": 4, "data": b"evil"})
        # A well-formed hash from a peer that never registered is refused too: only workers store artifacts.
        data = b"artifact"
        await worker.send(Cmd.STORE, {"sha256": hashlib.sha256(data).hexdigest(), "offset": 0, "size": len(data),
                                      "data": data})
        ack = await worker.recv()
        assert ack.cmd is Cmd.STORE_ACK and ack.body["error"] == "register first"
        assert not broker.blobs.has(hashlib.sha256(data).hexdigest())
    finally:
        client.close()
        worker.close()
    after = {p: v for p, v in tree(tmp_path).items() if "/state/" not in p}
    assert after == before
    assert (victim / "name.keep").read_text() == "precious"
    assert not list((tmp_path / "state" / "blobs" / "partial").iterdir())


class HoldsSave(ScriptedWorker):
    """Answers plans and trials from a table; keeps the save job until the test says so."""

    def _finish(self, key, job):
        if job["kind"] != "save":
            return super()._finish(key, job)
        self.save_key = key

    def finish_save(self) -> None:
        data = b"the true artifact"
        sha = hashlib.sha256(data).hexdigest()
        self.send(Cmd.STORE, {"sha256": sha, "offset": 0, "size": len(data), "data": data})
        self.result(self.save_key, {"ok": True, "artifact": sha})


async def _forge(peer: Peer, job: str, **body) -> None:
    await peer.send(Cmd.RESULT, {"trial_id": job, "attempt": 1, "ok": True, **body})


async def test_forged_plan_and_save_results_are_ignored(broker, client):
    """A plan waiting for a new worker (its first died) and a save held by a worker: RESULTs for them from
    an unregistered peer, a peer reusing the live worker's id, and a registered worker that does not hold
    the lease are all ignored (and counted); the task ends with the true plan and the true artifact."""
    first = await ScriptedWorker(broker.endpoints["workers"], "first", answer=lambda job: None).start()
    task_id = await client.submit(spec())
    await wait_for(lambda: first.assigned)
    first.silent = True  # it dies with the plan: the plan waits for another worker, with no lease holder
    await wait_for(lambda: broker.tasks[task_id].lease(JobRef("plan")) == (2, None), 20)
    await first.stop()

    stranger = Peer(broker.endpoints["workers"])  # never registered
    evil = Peer(broker.endpoints["workers"], identity=b"evil")  # registered, holds nothing
    await evil.send(Cmd.READY, ready("evil", slots=0))
    assert (await evil.recv()).cmd is Cmd.READY_ACK
    fake_plan = {"baseline": 0.0, "configs": [{"config": {"rtn": {"bits": 1}}, "label": "forged"}]}
    ignored = broker.core.ignored_results
    for attempt in (1, 2):
        await stranger.send(Cmd.RESULT, {"trial_id": f"{task_id}/plan", "attempt": attempt, "ok": True, **fake_plan})
        await evil.send(Cmd.RESULT, {"trial_id": f"{task_id}/plan", "attempt": attempt, "ok": True, **fake_plan})
    await wait_for(lambda: broker.core.ignored_results >= ignored + 4, 10)
    assert broker.tasks[task_id].state.value == "planning" and broker.tasks[task_id].baseline is None

    # The true worker plans and tunes; it keeps the save job while the attackers try again.
    real = await HoldsSave(broker.endpoints["workers"], "real", slots=2,
                           answer=metrics_answer({0: 0.5, 1: 0.95, 2: 0.2, 3: 0.99, 4: 0.99, 5: 0.99})).start()
    thief = Peer(broker.endpoints["workers"], identity=b"real")  # the live worker's id: refused by libzmq
    try:
        await wait_for(lambda: getattr(real, "save_key", None), 30)
        junk = b"attacker's pickle"
        sha = hashlib.sha256(junk).hexdigest()
        uploader = AsyncClient(broker.endpoints["clients"], timeout_s=10)
        await uploader.request(Cmd.BLOB_PUT, sha256=sha, offset=0, size=len(junk), data=junk)
        await uploader.close()
        ignored = broker.core.ignored_results
        for peer in (stranger, evil, thief):
            await _forge(peer, f"{task_id}/save", artifact=sha)
            await _forge(peer, f"{task_id}/1", metric=0.0)
        await wait_for(lambda: broker.core.ignored_results >= ignored + 4, 10)
        assert broker.tasks[task_id].state.value == "finalizing"
        real.finish_save()
        task = await done(client, task_id, timeout=30)
        assert task["state"] == "done" and task["winner"]["index"] == 1 and task["baseline"] == 1.0
        assert task["trials"][1]["metric"] == 0.95
        assert task["artifact"] == f"nsd-blob:{hashlib.sha256(b'the true artifact').hexdigest()}/model"
    finally:
        for peer in (stranger, evil, thief):
            peer.close()
        await real.stop()


async def test_a_second_peer_cannot_take_a_live_workers_id(broker, client):
    """Without CURVE: a peer connecting with a live worker's identity is refused while the worker is
    alive; its READY and RESULTs never count, and the worker keeps its leases."""
    w = await ScriptedWorker(broker.endpoints["workers"], "w1", answer=lambda job: None).start()
    thief = Peer(broker.endpoints["workers"], identity=b"w1")
    try:
        task_id = await client.submit(spec())
        await wait_for(lambda: w.assigned)
        await thief.send(Cmd.READY, ready("w1"))
        await _forge(thief, f"{task_id}/plan", baseline=0.0, configs=[{"config": {"rtn": {}}}])
        with pytest.raises(asyncio.TimeoutError):
            await thief.recv(timeout=1.5)  # no READY_ACK: the connection is not routed
        assert broker.tasks[task_id].state.value == "planning"
        assert broker.workers["w1"].running == {f"{task_id}/plan": 1}
        w.result(w.assigned[0][:2], plan_answer(1.0, 2))
        await wait_for(lambda: broker.tasks[task_id].state.value == "tuning", 10)
        assert broker.tasks[task_id].baseline == 1.0
    finally:
        thief.close()
        await w.stop()


async def test_curve_worker_ids_are_bound_to_the_key_that_first_registered_them(tmp_path):
    """Under CURVE: worker key node1 cannot act as node2 — its RESULTs for node2's leases are ignored, it
    cannot register as node2 (an id belongs to the key that first registered it, even once node2 is gone),
    and the task ends with node2's true answer."""
    from nsd.broker.config import BrokerConfig
    from nsd.broker.daemon import Broker
    from nsd.security import ClientKeys, allow, generate_keypair

    made = {name: generate_keypair(tmp_path / "made", name) for name in ("broker", "alice", "node1", "node2")}
    keys = tmp_path / "state" / "keys"
    allow(keys, "client", made["alice"][0], code=True)  # its tasks run a python recipe
    for name in ("node1", "node2"):
        allow(keys, "worker", made[name][0])
    broker = Broker(BrokerConfig(state_dir=tmp_path / "state", clients="tcp://127.0.0.1:*", workers="tcp://127.0.0.1:*",
                    events="tcp://127.0.0.1:*", heartbeat_s=0.5, liveness=6, curve_secret=made["broker"][1]))
    await broker.start()
    server = made["broker"][0]
    client = AsyncClient(broker.endpoints["clients"], timeout_s=10, curve_key=made["alice"][1], server_key=server)
    node2_keys, node1_keys = (ClientKeys.load(made[n][1], server) for n in ("node2", "node1"))
    node2 = await ScriptedWorker(broker.endpoints["workers"], "node2", slots=2, curve=node2_keys,
                                 answer=lambda job: plan_answer(1.0, 3) if job["kind"] == "plan" else None).start()
    node1 = Peer(broker.endpoints["workers"], identity=b"node1", curve=node1_keys)
    impostor = Peer(broker.endpoints["workers"], identity=b"node2", curve=node1_keys)
    try:
        await node1.send(Cmd.READY, ready("node1", slots=0))
        assert (await node1.recv()).cmd is Cmd.READY_ACK
        task_id = await client.submit(spec())
        await wait_for(lambda: len([a for a in node2.assigned if a[2]["kind"] == "trial"]) == 2, 20)
        ignored = broker.core.ignored_results
        for job, attempt, _ in node2.assigned[1:]:
            await node1.send(Cmd.RESULT, {"trial_id": job, "attempt": attempt, "ok": True, "metric": 1.0})
            await impostor.send(Cmd.RESULT, {"trial_id": job, "attempt": attempt, "ok": True, "metric": 1.0})
        await wait_for(lambda: broker.core.ignored_results >= ignored + 2, 10)
        assert all(t.state.value == "running" for t in broker.tasks[task_id].trials[:2])
        for key in [a[:2] for a in node2.assigned[1:]]:  # node2's own answers: trial 1 passes
            node2.result(key, {"ok": True, "metric": 0.2 if key[0].endswith("/0") else 0.99})
        task = await done(client, task_id, timeout=30)
        assert task["winner"]["index"] == 1 and task["trials"][0]["metric"] == 0.2
        await node2.stop()  # gone without a goodbye
        registered = broker.workers.get("node2")
        reply = None
        for _ in range(20):  # a new connection once node2's has closed (till then, the id is taken)
            late = Peer(broker.endpoints["workers"], identity=b"node2", curve=node1_keys)
            try:
                await late.send(Cmd.READY, ready("node2"))
                reply = await late.recv(timeout=0.5)
                break
            except asyncio.TimeoutError:
                continue
            finally:
                late.close()
        assert reply is not None and reply.cmd is Cmd.DISCONNECT and reply.body["fatal"] and "bound to another key" in reply.body["reason"]
        assert broker.workers.get("node2") in (None, registered) and broker.metrics.value("nsd_refused_workers_total") >= 1
    finally:
        for peer in (node1, impostor):
            peer.close()
        await client.close()
        await broker.stop()
    # The binding lives in the state dir: after a restart node1's key is still not node2.
    from nsd.broker.store import Store

    store = Store(tmp_path / "state" / "nsd.sqlite3")
    assert store.worker_key("node2") == node2_keys.public.decode() and store.worker_key("node1") == node1_keys.public.decode()
    store.close()


# ---- resources --------------------------------------------------------------------------------------


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_unread_replies_do_not_grow_the_brokers_memory(broker_process, tmp_path):
    """A peer that never reads asks for hundreds of 4 MiB ranges of a stored blob (and a stranger for
    FETCHes): before, 250 requests took the broker from 43 to 1,039 MiB; now replies past its send queue
    (peer_queue × one 1 MiB chunk) are dropped, and RSS stays within 150 MiB of where it started."""
    proc, endpoints = broker_process
    await wait_for(lambda: hello_ok(endpoints["clients"]), 30)
    data = os.urandom(3 * 1024 * 1024)
    sha = hashlib.sha256(data).hexdigest()
    client = AsyncClient(endpoints["clients"], timeout_s=10)
    for offset in range(0, len(data), 1024 * 1024):
        await client.request(Cmd.BLOB_PUT, sha256=sha, offset=offset, size=len(data),
                             data=data[offset:offset + 1024 * 1024])
    await client.close()
    base = _rss_mib(proc.pid)
    readers = [Peer(endpoints["clients"]) for _ in range(3)]
    fetcher = Peer(endpoints["workers"], identity=b"greedy")
    for peer in readers:
        peer.sock.setsockopt(zmq.RCVHWM, 1)  # and never reads
        peer.sock.setsockopt(zmq.RCVBUF, 4096)
    try:
        for i in range(300):
            for peer in readers:
                await peer.send(Cmd.BLOB_GET, {"req": i, "sha256": sha, "offset": 0, "length": 4 * 1024 * 1024})
            await fetcher.send(Cmd.FETCH, {"sha256": sha, "offset": 0, "length": 4 * 1024 * 1024})
            if i % 50 == 0:
                await asyncio.sleep(0.05)
        await wait_for(lambda: hello_ok(endpoints["clients"]), 30)  # it is still serving...
        peak = max(_rss_mib(proc.pid) for _ in range(5) if not time.sleep(0.1))
        print(f"broker RSS under the amplification attack: {base:.0f} -> {peak:.0f} MiB")
        assert peak - base < 150, f"broker RSS grew from {base:.0f} to {peak:.0f} MiB"
    finally:
        for peer in (*readers, fetcher):
            peer.close()


async def test_an_oversized_submit_is_refused_at_once_and_others_are_served(broker, client):
    """A 14.3 MiB SUBMIT: refused at the door with a clear error (before: a 13 s stall, 125 MiB kept),
    and another client's HELLO sent right after it is answered within a second."""
    big = {"name": "x", "recipe": {"kind": "python", "file": "r.py"}, "tuning": {"config_set": [{"rtn": {}}]},
           "junk": "x" * (15_000_000)}
    attacker = Peer(broker.endpoints["clients"])
    try:
        await attacker.send(Cmd.SUBMIT, {"req": 1, "spec": big})
        t0 = time.monotonic()
        assert (await client.hello())["protocol"] == 1
        assert time.monotonic() - t0 < 1.0
        reply = await attacker.recv(CLIENT_TO_BROKER | frozenset({Cmd.REPLY, Cmd.ERROR}), timeout=5)
        assert reply.cmd is Cmd.ERROR and "over its limit" in reply.body["error"]
        assert not broker.tasks
    finally:
        attacker.close()
    # The client library refuses it before sending, with the limit in the message.
    huge = {"model": {"path": __file__, "shared": True}, "recipe": {"kind": "python", "file": __file__},
            "tuning": {"config_set": [{"rtn": {"bits": [4] * 300_000}}]}}
    with pytest.raises(BrokerError, match="task spec is too large"):
        await client.submit(huge)


async def test_a_peers_abandoned_uploads_do_not_cancel_anothers(broker, client):
    """One peer opens 100 uploads and abandons them: it only ever loses its own oldest; another client's
    upload in progress completes."""
    data = os.urandom(1536 * 1024)
    sha = hashlib.sha256(data).hexdigest()
    first = await client.request(Cmd.BLOB_PUT, sha256=sha, offset=0, size=len(data), data=data[:1024 * 1024])
    assert first["offset"] == 1024 * 1024
    flood = Peer(broker.endpoints["clients"])
    try:
        for i in range(100):
            junk = os.urandom(8)
            await flood.send(Cmd.BLOB_PUT, {"req": i, "sha256": hashlib.sha256(junk + b"!").hexdigest(), "offset": 0,
                                            "size": 16, "data": junk})
            await flood.recv()
        assert len(broker.blobs._uploads) <= broker.limits.uploads_per_peer + 1
    finally:
        flood.close()
    last = await client.request(Cmd.BLOB_PUT, sha256=sha, offset=1024 * 1024, size=len(data), data=data[1024 * 1024:])
    assert last["complete"] and broker.blobs.has(sha)


async def test_many_idle_connections_do_not_stop_a_new_client(broker_process):
    """1,100 idle connections (before: the 1,024-descriptor limit ran out and the broker spun at 99% CPU):
    the broker raised its open-files limit at start, and a new client is served."""
    from nsd.limits import raise_open_files_limit

    proc, endpoints = broker_process
    await wait_for(lambda: hello_ok(endpoints["clients"]), 30)
    if raise_open_files_limit()[0] < 3000:  # this test's own side needs two descriptors per connection
        pytest.skip("the hard RLIMIT_NOFILE here is under 3000: cannot open 1,100 connections from the test")
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 2000)
    socks = []
    try:
        for _ in range(1100):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoints["clients"])
            s.send_multipart(pack(Cmd.HELLO, {"req": 1}))  # a handshake, then silence
            socks.append(s)
        # Each connection the broker accepted holds one of its descriptors.
        await wait_for(lambda: len(os.listdir(f"/proc/{proc.pid}/fd")) > 1000, 60)
        assert (await hello(endpoints["clients"], timeout=10))["protocol"] == 1
        assert proc.poll() is None
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()


async def test_a_workers_heartbeat_on_the_client_socket_is_refused_at_the_door(broker):
    """The idle-heartbeat shortcut (recognised byte for byte, never decoded) is the worker socket's only:
    on the client socket a HEARTBEAT is what any other worker message is there, refused and counted."""
    peer = Peer(broker.endpoints["clients"])
    try:
        before = broker._bad.count
        await peer.send(Cmd.HEARTBEAT, {"running": []})
        await wait_for(lambda: broker._bad.count == before + 1, 10)
    finally:
        peer.close()


async def test_hostile_field_values_are_refused_at_the_door():
    """Trial ids, cores, sizes and plan configs that a handler must never see."""
    bad = [
        (Cmd.RESULT, {"trial_id": "0123456789ab/-6", "attempt": 1, "ok": True}),
        (Cmd.RESULT, {"trial_id": "0123456789ab/ +1 ", "attempt": 1, "ok": True}),
        (Cmd.RESULT, {"trial_id": "0123456789ab/01", "attempt": 1, "ok": True}),
        (Cmd.RESULT, {"trial_id": "0123456789ab/1", "attempt": 0, "ok": True}),
        (Cmd.RESULT, {"trial_id": "0123456789ab/plan", "attempt": 1, "ok": True,
                      "configs": [{"config": {"rtn": {"bits": b"\x00raw"}}}]}),
        (Cmd.RESULT, {"trial_id": "0123456789ab/1", "attempt": 1, "ok": True, "metric": float("nan")}),
        (Cmd.READY, ready("w", cores=10**9)),
        (Cmd.READY, ready("../w")),
        (Cmd.FETCH, {"sha256": "c" * 64, "offset": -1, "length": 10}),
        (Cmd.STORE, {"sha256": "c" * 64, "offset": 0, "size": 1 << 50, "data": b""}),
    ]
    from nsd.protocol import WORKER_TO_BROKER

    for cmd, body in bad:
        with pytest.raises(ProtocolError):
            unpack(pack(cmd, body), WORKER_TO_BROKER)
    ok = unpack(pack(Cmd.RESULT, {"trial_id": "0123456789ab/17", "attempt": 2, "ok": True, "metric": 0.5}),
                WORKER_TO_BROKER)
    assert ok.body["metric"] == 0.5


async def test_logs_larger_than_a_message_are_cut_not_lost(broker, client):
    """300 jobs with 64 KiB logs each (19 MiB, over the 16 MiB message limit; before: `Client.logs` said
    "is `nsd broker` running?"): LOGS answers, the oldest entries cut with a note, and one job's log
    can still be asked for alone."""
    def answer(job):
        if job["kind"] == "plan":
            return {**plan_answer(1.0, 300), "log": "plan log"}
        return {"ok": True, "metric": 0.1, "log": "x" * 70_000 + f":{job['index']}"}

    w = await ScriptedWorker(broker.endpoints["workers"], "w", slots=4, answer=answer).start()
    try:
        task_id = await client.submit(spec(max_trials=300))
        await wait_for(lambda: broker.tasks[task_id].trials and broker.tasks[task_id].n_unfinished == 0, 60)
        logs = (await client.request(Cmd.LOGS, task_id=task_id))["logs"]  # one reply, under the limit
        assert len(logs) == 301 and any(entry.get("cut") for entry in logs)
        one = await client.logs(task_id, 299)
        assert one[0]["text"].endswith(":299") and not one[0].get("cut")
        whole = await client.logs(task_id)  # the client asks for the cut ones job by job
        assert len(whole) == 301 and not any(entry.get("cut") for entry in whole)
    finally:
        await w.stop()
