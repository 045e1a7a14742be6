"""The whole nsd wire format: message types, body shapes, framing. Pure: no sockets, no I/O.

Every message is ``[b"NSD1"][type: 1 byte][msgpack body]`` (a ROUTER prepends the peer identity; a
PUB/XPUB event prepends its topic, the task id). Bodies are msgpack maps whose required fields are
checked on every decode; extra fields are allowed so that a newer peer can add some.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import msgpack

MAGIC = b"NSD1"
PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # also set as the sockets' MAXMSGSIZE


class Cmd(enum.IntEnum):
    # worker -> broker
    READY = 0x01  # register: who I am, my slots, what I still run, unacked results
    HEARTBEAT = 0x02  # both ways: I am alive (and, from a worker, what I run)
    RESULT = 0x03  # a job finished (plan or trial), keyed by (trial_id, attempt)
    BYE = 0x04  # I am leaving; requeue what I hold
    FETCH = 0x05  # send me this range of a blob (a worker keeps a few in flight: its credit window)
    STORE = 0x06  # one chunk of a blob I upload (an artifact), in order
    # broker -> worker
    READY_ACK = 0x11  # registration accepted
    ASSIGN = 0x12  # run this job on one of your free slots (uses one credit)
    RESULT_ACK = 0x13  # result committed: drop it from your outbox
    CANCEL = 0x14  # stop this job: its result is no longer wanted
    DISCONNECT = 0x15  # I do not know you or you spoke out of turn: re-register (or stop, if fatal)
    CHUNK = 0x16  # a blob range you asked for (or an error)
    STORE_ACK = 0x17  # chunk stored: next offset, and whether the blob is complete (or an error)
    # client -> broker
    HELLO = 0x21  # versions and the events endpoint
    SUBMIT = 0x22  # a task spec; answered with the task id after commit
    STATUS = 0x23  # one task's snapshot, with its event seq
    LIST = 0x24  # all tasks, a line each
    CANCEL_TASK = 0x25  # cancel a task
    RESULT_GET = 0x26  # a task's full result
    CLUSTER = 0x27  # workers and their slots
    BLOB_HAVE = 0x28  # which of these blobs are missing?
    BLOB_PUT = 0x29  # one chunk of an upload, in order; the last one is checked against its hash
    BLOB_GET = 0x2A  # a range of a stored blob
    LOGS = 0x2B  # the logs of a task's jobs (all, or one trial's)
    # broker -> client
    REPLY = 0x31  # success; body carries `req` and the answer
    ERROR = 0x32  # failure; body carries `req` and a message for a person
    # broker -> subscribers (XPUB)
    EVENT = 0x41  # something happened to a task; carries (task_id, seq)


# Required fields and their types for each body. `list` fields hold plain msgpack values.
_Num = (int, float)
SHAPES: dict[Cmd, dict[str, type | tuple[type, ...]]] = {
    Cmd.READY: {"worker_id": str, "boot_id": str, "host": str, "cores": int, "slots": int,
                "version": int, "running": list, "outbox": list},
    Cmd.HEARTBEAT: {},
    Cmd.RESULT: {"trial_id": str, "attempt": int, "ok": bool},
    Cmd.BYE: {},
    Cmd.FETCH: {"sha256": str, "offset": int, "length": int},
    Cmd.STORE: {"sha256": str, "offset": int, "size": int, "data": bytes},
    Cmd.READY_ACK: {"heartbeat_s": _Num},
    Cmd.ASSIGN: {"trial_id": str, "attempt": int, "job": dict},
    Cmd.RESULT_ACK: {"trial_id": str, "attempt": int},
    Cmd.CANCEL: {"trial_id": str, "attempt": int},
    Cmd.DISCONNECT: {"reason": str},
    Cmd.CHUNK: {"sha256": str, "offset": int},
    Cmd.STORE_ACK: {"sha256": str, "offset": int},
    Cmd.HELLO: {"req": int},
    Cmd.SUBMIT: {"req": int, "spec": dict},
    Cmd.STATUS: {"req": int, "task_id": str},
    Cmd.LIST: {"req": int},
    Cmd.CANCEL_TASK: {"req": int, "task_id": str},
    Cmd.RESULT_GET: {"req": int, "task_id": str},
    Cmd.CLUSTER: {"req": int},
    Cmd.BLOB_HAVE: {"req": int, "sha256": list},
    Cmd.BLOB_PUT: {"req": int, "sha256": str, "offset": int, "size": int, "data": bytes},
    Cmd.BLOB_GET: {"req": int, "sha256": str, "offset": int, "length": int},
    Cmd.LOGS: {"req": int, "task_id": str},
    Cmd.REPLY: {"req": int},
    Cmd.ERROR: {"req": int, "error": str},
    Cmd.EVENT: {"task_id": str, "seq": int, "kind": str},
}

WORKER_TO_BROKER = frozenset({Cmd.READY, Cmd.HEARTBEAT, Cmd.RESULT, Cmd.BYE, Cmd.FETCH, Cmd.STORE})
BROKER_TO_WORKER = frozenset({Cmd.READY_ACK, Cmd.ASSIGN, Cmd.RESULT_ACK, Cmd.CANCEL,
                              Cmd.HEARTBEAT, Cmd.DISCONNECT, Cmd.CHUNK, Cmd.STORE_ACK})
CLIENT_TO_BROKER = frozenset({Cmd.HELLO, Cmd.SUBMIT, Cmd.STATUS, Cmd.LIST, Cmd.CANCEL_TASK,
                              Cmd.RESULT_GET, Cmd.CLUSTER, Cmd.BLOB_HAVE, Cmd.BLOB_PUT, Cmd.BLOB_GET,
                              Cmd.LOGS})
BROKER_TO_CLIENT = frozenset({Cmd.REPLY, Cmd.ERROR})


class ProtocolError(ValueError):
    """A message that is not nsd's, or not the shape its type requires."""


@dataclass(frozen=True)
class Message:
    cmd: Cmd
    body: dict[str, Any]


def pack(cmd: Cmd, body: dict[str, Any] | None = None) -> list[bytes]:
    """The frames of one message (without any routing identity or topic)."""
    return [MAGIC, bytes([cmd]), msgpack.packb(body or {}, use_bin_type=True)]


def unpack(frames: list[bytes], allowed: frozenset[Cmd]) -> Message:
    """Decode and check one message; raise ProtocolError with a reason a person can read."""
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 frames, got {len(frames)}")
    magic, kind, raw = frames
    if magic != MAGIC:
        if magic[:3] == MAGIC[:3]:
            raise ProtocolError(f"protocol version {magic[3:]!r} not supported (this side speaks {MAGIC!r})")
        raise ProtocolError("not an nsd message (bad header)")
    if len(kind) != 1:
        raise ProtocolError("type frame must be one byte")
    try:
        cmd = Cmd(kind[0])
    except ValueError:
        raise ProtocolError(f"unknown message type 0x{kind[0]:02x}") from None
    if cmd not in allowed:
        raise ProtocolError(f"{cmd.name} is not valid on this socket")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ProtocolError("message too large")
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"body is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise ProtocolError("body must be a map")
    for field, kind_ in SHAPES[cmd].items():
        if field not in body:
            raise ProtocolError(f"{cmd.name}: missing field {field!r}")
        value = body[field]
        # bool is an int in Python; an int field must not accept True.
        if not isinstance(value, kind_) or (isinstance(value, bool) and kind_ is not bool):
            raise ProtocolError(f"{cmd.name}: field {field!r} has the wrong type")
    return Message(cmd, body)


def event_frames(task_id: str, body: dict[str, Any]) -> list[bytes]:
    """An XPUB event: topic first so that SUB filters by task id."""
    return [task_id.encode(), *pack(Cmd.EVENT, body)]
