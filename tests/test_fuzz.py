"""Thousands of random and mutated frames on every broker socket: the broker keeps serving, logs no
internal error, keeps its bookkeeping bounded, and a task submitted afterwards completes."""

from __future__ import annotations

import asyncio
import logging
import random

import msgpack
import zmq
import zmq.asyncio

from nsd.protocol import CLIENT_TO_BROKER, MAGIC, WORKER_TO_BROKER, Cmd, ProtocolError, pack, unpack
from tests.conftest import wait_for
from tests.peers import ScriptedWorker, done, metrics_answer, spec

N_PER_SOCKET = 3000


HOSTILE_VALUES = [-1, -2**63, 2**63 - 1, 10**9, 0, 1.5, float("nan"), float("inf"), True, None, "", "x" * 5000,
                  "../../etc/passwd", "/abs/path", "0123456789ab/-6", "0123456789ab/ +1 ", "0123456789ab/plan",
                  "C" * 64, b"raw bytes", [b"raw"], {"bits": b"\x00"}, [["0123456789ab/1", -1]] * 3,
                  [{"config": {"rtn": {"bits": b"raw"}}, "label": "x"}], [{"trial_id": "x/1", "attempt": 1}]]


def hostile(rng: random.Random, cmd: Cmd, body: dict) -> list[bytes]:
    """A well-formed message whose fields hold values no handler should ever see."""
    body = dict(body)
    for key in rng.sample(sorted(body), k=min(len(body), rng.randint(1, 2))):
        body[key] = rng.choice(HOSTILE_VALUES)
    if rng.random() < 0.3:  # and optional fields the handlers read
        body[rng.choice(["metric", "baseline", "configs", "artifact", "log", "error", "requeue", "handback",
                         "cores_per_trial", "draining", "job", "running", "tenant", "code", "offset", "limit",
                         "owner", "before", "worker", "all"])] = rng.choice(HOSTILE_VALUES)
    return pack(cmd, body)


def valid_bodies() -> dict[Cmd, dict]:
    sha = "c" * 64
    return {
        Cmd.READY: {"worker_id": "fuzz", "boot_id": "x", "host": "h", "cores": 1, "slots": 1, "version": 1,
                    "running": [["0123456789ab/0", 1]],
                    "outbox": [{"trial_id": "0123456789ab/0", "attempt": 1, "ok": True}]},
        Cmd.HEARTBEAT: {"running": []}, Cmd.RESULT: {"trial_id": "0123456789ab/plan", "attempt": 1, "ok": True},
        Cmd.BYE: {}, Cmd.FETCH: {"sha256": sha, "offset": 0, "length": 10},
        Cmd.STORE: {"sha256": sha, "offset": 0, "size": 4, "data": b"abcd"},
        Cmd.HELLO: {"req": 1}, Cmd.SUBMIT: {"req": 2, "spec": {"tuning": {"config_set": [{"rtn": {}}]}}},
        Cmd.STATUS: {"req": 3, "task_id": "abcd"}, Cmd.LIST: {"req": 4}, Cmd.CANCEL_TASK: {"req": 5, "task_id": "x"},
        Cmd.RESULT_GET: {"req": 6, "task_id": "y"}, Cmd.CLUSTER: {"req": 7},
        Cmd.BLOB_HAVE: {"req": 8, "sha256": [sha]},
        Cmd.BLOB_PUT: {"req": 9, "sha256": sha, "offset": 0, "size": 8, "data": b"abcd"},
        Cmd.BLOB_GET: {"req": 10, "sha256": sha, "offset": 0, "length": 4}, Cmd.LOGS: {"req": 11, "task_id": "z"},
        Cmd.DELETE_TASK: {"req": 12, "task_id": "abcd", "tenant": "alice"}, Cmd.AUDIT: {"req": 13, "limit": 5},
        Cmd.CACHE_PURGE: {"req": 14, "all": True},
    }


def valid_messages() -> list[list[bytes]]:
    return [pack(cmd, body) for cmd, body in valid_bodies().items()]


GARBAGE = [[b""], [b"x" * 10], [MAGIC], [MAGIC, b"\x22", b"\xc1"], [b"NSD2", b"\x01", b"\x80"],
           [MAGIC, b"\x99", msgpack.packb({})], [MAGIC, bytes([Cmd.SUBMIT]), msgpack.packb({"req": "x"})],
           [MAGIC, bytes([Cmd.READY]), msgpack.packb({"worker_id": 1})], [MAGIC, bytes([Cmd.ASSIGN]), b"\x80"],
           [MAGIC, bytes([Cmd.RESULT]), msgpack.packb({"trial_id": "a/b", "attempt": 1, "ok": True})],
           [MAGIC, bytes([Cmd.RESULT]), msgpack.packb({"trial_id": "zz/plan", "attempt": 1, "ok": True})],
           [MAGIC, bytes([Cmd.SUBMIT]), msgpack.packb({"req": 1, "spec": {"tuning": [1]}})],
           [MAGIC, bytes([Cmd.STATUS]), msgpack.packb({"req": 1, "task_id": "\x00" * 300})]]


def mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    frames = list(frames)
    choice = rng.randrange(7)
    i = rng.randrange(len(frames))
    if choice == 0 and frames[i]:  # flip bytes
        b = bytearray(frames[i])
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        frames[i] = bytes(b)
    elif choice == 1:  # truncate
        frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
    elif choice == 2:  # drop or duplicate a frame
        if rng.random() < 0.5:
            del frames[i]
        else:
            frames.insert(i, frames[i])
    elif choice == 3:  # replace the body with random msgpack
        value = rng.choice([None, 1, -1, 2**63, 1.5, "s", b"b", [], {}, {"req": "x"}, {"req": 1, "spec": []},
                            {"req": 1, "task_id": "\x00" * 10_000}, {"trial_id": 5}, [[1] * 100]])
        frames[-1] = msgpack.packb(value)
    elif choice == 4:  # a random type byte
        if len(frames) > 1:
            frames[1] = bytes([rng.randrange(256)])
    elif choice == 5:  # random garbage frames
        frames = [rng.randbytes(rng.randrange(64)) for _ in range(rng.randint(1, 5))]
    else:  # a large body
        frames[-1] = msgpack.packb({"req": 1, "sha256": ["x" * 64] * 2000})
    return frames or [b""]


async def test_fuzzing_every_socket_leaves_the_broker_serving(broker, client, caplog):
    caplog.set_level(logging.WARNING, logger="nsd.broker")
    rng = random.Random(20261127)
    valid = valid_messages()
    ctx = zmq.asyncio.Context()
    socks = []
    bad_sent = 0  # what the broker must count as bad: each refused by the schemas at its door
    try:
        for name, kind in (("clients", zmq.DEALER), ("workers", zmq.DEALER), ("events", zmq.XSUB)):
            for _ in range(3):  # several peers per socket
                sock = ctx.socket(kind)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(broker.endpoints[name])
                socks.append(sock)
            allowed = {"clients": CLIENT_TO_BROKER, "workers": WORKER_TO_BROKER}.get(name)  # events: subscriptions
            for frames in GARBAGE:  # the known bad ones first (each once was a bug elsewhere), then random
                await socks[-1].send_multipart(frames)
                bad_sent += _refused(frames, allowed)
            bodies = list(valid_bodies().items())
            for n in range(N_PER_SOCKET):
                if n % 10 == 0:
                    frames = rng.choice(valid)
                elif n % 3 == 0:  # valid-looking frames, hostile field values
                    frames = hostile(rng, *rng.choice(bodies))
                else:
                    frames = mutate(rng, rng.choice(valid))
                await socks[-1 - n % 3].send_multipart(frames)
                bad_sent += _refused(frames, allowed)
                if n % 200 == 0:
                    await asyncio.sleep(0)  # let the broker keep up, as a real flood would be paced by TCP
        assert bad_sent > N_PER_SOCKET
        await wait_for(lambda: broker._bad.count >= bad_sent, 30)  # every frame sent has been read
        assert broker._bad.count == bad_sent and broker.tasks == {} and broker.workers == {}  # nothing got in
        for sock in socks:
            sock.close(linger=0)
        assert all(not loop.done() for loop in broker._loops)  # every loop of the broker still runs
        assert len(broker.blobs._uploads) <= broker.blobs.max_open_uploads
        assert len(broker._bad._seen) <= 3 * 3 + 1
        # Still serving, and correctly: a real task completes.
        assert (await client.hello())["protocol"] == 1
        w = await ScriptedWorker(broker.endpoints["workers"], "real", slots=2,
                                 answer=metrics_answer({0: 0.5, 1: 0.95, 2: 0.2, 3: 0.99, 4: 0.99, 5: 0.99})).start()
        try:
            task = await done(client, await client.submit(spec()), timeout=60)
            assert task["state"] == "done" and task["winner"]["index"] == 1
        finally:
            await w.stop()
        internal = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert internal == [], [r.getMessage() for r in internal]
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()


def _refused(frames: list[bytes], allowed) -> bool:
    """Whether the broker's door (nsd.protocol.unpack, the same schemas) refuses these frames."""
    if allowed is None:
        return False
    try:
        unpack(frames, allowed)
    except ProtocolError:
        return True
    return False
