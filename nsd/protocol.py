"""The whole nsd wire format: message types, body shapes, framing. Pure: no sockets, no I/O.

Every message is ``[b"NSD1"][type: 1 byte][msgpack body]`` (a ROUTER prepends the peer identity; a
PUB/XPUB event prepends its topic, the task id). Bodies are msgpack maps whose required fields are
checked on every decode; extra fields are allowed so that a newer peer can add some.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import msgpack

from nsd.fields import (BOOL, JSON_MAP, MAP, NUMBER, OPT_NUMBER, SHA256, SQL_NAME, Check,  # noqa: F401 (the wire's
                        integer, is_json, listof, of_type, sql_row, sql_tables, text)  # field checks, re-exported)

MAGIC = b"NSD1"
PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the sockets' MAXMSGSIZE: libzmq disconnects a peer that sends more
# Where a broker binds by default, and so where clients and workers look for it: one table for both sides.
DEFAULT_ENDPOINTS = {"clients": "tcp://127.0.0.1:5550", "workers": "tcp://127.0.0.1:5551",
                     "events": "tcp://127.0.0.1:5552"}


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
    DROP = 0x18  # erase these blobs and these tasks' folders from your cache (a task was deleted)
    RULE = 0x19  # the early-stop rule of a trial you run, now that the goal is known (the baseline landed)
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
    DELETE_TASK = 0x2C  # erase a task and what is kept about it (README "Privacy")
    AUDIT = 0x2D  # the audit log: who did what to which task (admins)
    CACHE_PURGE = 0x2E  # drop metric cache entries: of a task, of a worker, or all
    # broker -> client
    REPLY = 0x31  # success; body carries `req` and the answer
    ERROR = 0x32  # failure; body carries `req` and a message for a person
    # broker -> subscribers (XPUB)
    EVENT = 0x41  # something happened to a task; carries (task_id, seq)
    # broker <-> broker, the pair's link (nsd.broker.peer): each side sends on its DEALER, reads its ROUTER
    PEER_STATE = 0x51  # heartbeat and Binary Star event: my role, state, epoch, lsn, whether my copy is whole
    PEER_TX = 0x52  # active -> passive: one committed transaction's rows (or one part of them), numbered lsn
    PEER_ACK = 0x53  # passive -> active: every transaction up to lsn is written here
    PEER_SNAPSHOT = 0x54  # active -> passive: a snapshot of the state database is ready to be fetched
    PEER_FETCH = 0x55  # passive -> active: send me this range of the snapshot or of a blob
    PEER_CHUNK = 0x56  # active -> passive: a range of the snapshot or of a blob (or an error)
    PEER_BLOBS = 0x57  # active -> passive: blobs I hold (a page of a listing, or ones just completed)
    PEER_HAVE = 0x58  # passive -> active: these blobs are stored here now
    PEER_LIST = 0x59  # passive -> active: list your blobs after this name


# ---- bounds: every field a peer sends is checked against these before any handler sees it (nsd.fields) ----

MAX_BLOB_OFFSET = 1 << 46  # 64 TiB: larger than any blob a broker accepts (its own limit is lower)
MAX_CHUNK_BYTES = 4 * 1024 * 1024  # one BLOB_PUT/STORE chunk, one BLOB_GET/FETCH range
MAX_CORES = 4096  # cores or slots a worker may declare (larger machines do not exist yet)
MAX_ATTEMPT, MAX_LEASES, MAX_OUTBOX = 1000, 4096, 1024  # a job's attempts; READY's `running` and `outbox` entries
MAX_TEXT = 256 * 1024  # a log tail, an error message
MAX_CONFIGS = 100_000  # trials in one plan
TASK_ID = re.compile(r"[0-9a-f]{12}")
PEER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")  # worker ids (they are ZeroMQ identities)
MAX_TX_ROWS, MAX_LSN = 100_000, 1 << 62  # rows in one part of a replicated transaction; its number
TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")  # nsd.tenants.TENANT: key and token names
MAX_DROP, MAX_PAGE, DEFAULT_PAGE = 1000, 10_000, 2_000  # a DROP's names; trials a STATUS/RESULT_GET page holds


# ---- jobs: what a worker runs for a task ---------------------------------------------------------------
# A job id is `<task>/<kind>` for a task-level job, `<task>/<index>` for a trial and `<task>/<kind>/<index>`
# for any other job about one trial. The broker's table of job kinds (nsd.broker.jobs) and the worker's
# checks (nsd.worker.checks) and runner both follow this one: a new kind is one row here and one there.


@dataclass(frozen=True)
class WireJob:
    name: str
    per_trial: bool  # its id names one trial's index
    config: bool  # its ASSIGN carries one trial's `index` and `config` (a save: the winner's)


TRIAL = "trial"  # the per-trial job whose id is just the index
JOB_KINDS: dict[str, WireJob] = {k.name: k for k in (
    WireJob("plan", per_trial=False, config=False),  # expand the config set in INC's order (no model needed)
    WireJob("baseline", per_trial=False, config=False),  # evaluate FP32 once, list the ops (beside the trials)
    WireJob(TRIAL, per_trial=True, config=True),  # quantize one config and evaluate it
    WireJob("refine", per_trial=True, config=True),  # a trial that stopped early, evaluated again in full
    WireJob("save", per_trial=False, config=True),  # the winner's model, saved and uploaded
    WireJob("verify", per_trial=False, config=True),  # the saved model loaded and its metric measured again
)}


_INDEX = r"(?:0|[1-9][0-9]{0,6})"  # the part of a job id after the task id, for every kind in JOB_KINDS:
JOB_NAME = re.compile("|".join([*(k.name if not k.per_trial else f"{k.name}/{_INDEX}" for k in JOB_KINDS.values()
                                  if k.name != TRIAL), _INDEX]))  # "plan", "save", "3" (a trial), "<kind>/3"
JOB_ID = re.compile(rf"([0-9a-f]{{12}})/({JOB_NAME.pattern})")


class JobRef(NamedTuple):
    """One job of a task: its kind and, for a per-trial kind, the trial's index."""
    kind: str
    index: int | None = None

    @property
    def name(self) -> str:
        """The job id's part after the task id (also the job's name in logs)."""
        if self.kind == TRIAL:
            return str(self.index)
        return self.kind if self.index is None else f"{self.kind}/{self.index}"

    def id(self, task_id: str) -> str:
        return f"{task_id}/{self.name}"


def parse_job_name(name: str) -> JobRef:
    """The JobRef of a checked job name ("plan", "3", "<kind>/3"); ValueError for anything else."""
    if not isinstance(name, str) or JOB_NAME.fullmatch(name) is None:
        raise ValueError(f"not a job name: {str(name)[:40]!r}")
    kind, _, index = name.rpartition("/")
    if kind:
        return JobRef(kind, int(index))
    return JobRef(TRIAL, int(name)) if name.isdigit() else JobRef(name)


ATTEMPT = integer(1, MAX_ATTEMPT)
LEASE = Check("a [job id, attempt] pair", lambda v: isinstance(v, (list, tuple)) and len(v) == 2
              and text(40, JOB_ID).ok(v[0]) and ATTEMPT.ok(v[1]))
PLANNED = Check("a {config: map, label: string} entry", lambda v: isinstance(v, dict) and JSON_MAP.ok(v.get("config"))
                and isinstance(v.get("label", ""), str) and len(v.get("label", "")) <= 500)


# ---- deployment figures (nsd/figures.py says what they mean) -------------------------------------------
# Exact shapes, unknown keys refused: figures are stored, cached and shown to people as they came.

MAX_FORMS = 4  # measured forms in one figures map (FP32: eager and compiled)
HARDWARE_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a worker's --label (nsd.spec's too)
ISA_FLAG = re.compile(r"[a-z0-9_]{1,32}")


def _nonneg(v: Any) -> bool:
    return NUMBER.ok(v) and v >= 0


def _count(v: Any, hi: int = 1 << 62) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= hi


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _short(n: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and len(v) <= n


def _exactly(v: Any, fields: dict[str, Callable[[Any], bool]]) -> bool:
    return isinstance(v, dict) and set(v) == set(fields) and all(ok(v[k]) for k, ok in fields.items())


_FORM = {
    "form": _short(32), "runtime": _short(200), "p50_ms": lambda v: _nonneg(v) and v > 0, "p90_ms": _nonneg,
    "spread": _nonneg, "repeats": lambda v: _count(v, 1 << 31) and v >= 1, "throughput": _nonneg,
    "batch": lambda v: _count(v, 1 << 31) and v >= 1, "load_s": _nonneg, "compile_s": _opt(_nonneg),
    "peak_bytes": _opt(_count), "run_bytes": _opt(_count),
    "cores": lambda v: isinstance(v, list) and 1 <= len(v) <= MAX_CORES and all(_count(c, 1 << 20) for c in v),
    "threads": lambda v: _count(v, MAX_CORES) and v >= 1, "exclusive": lambda v: isinstance(v, bool),
    "paused": lambda v: _count(v, MAX_CORES), "note": _opt(_short(500)),
}
_INPUT = {
    "names": lambda v: isinstance(v, list) and len(v) <= 64 and all(_short(64)(n) for n in v),
    "shapes": lambda v: isinstance(v, list) and len(v) <= 64 and all(
        s is None or (isinstance(s, list) and len(s) <= 8 and all(_count(d, 1 << 40) for d in s)) for s in v),
}
_FIGURES = {
    "size_bytes": _opt(_count), "size_of": _short(200),
    "forms": lambda v: isinstance(v, list) and 1 <= len(v) <= MAX_FORMS and all(_exactly(f, _FORM) for f in v),
    "input": lambda v: _exactly(v, _INPUT),
    "notes": lambda v: isinstance(v, list) and len(v) <= 8 and all(_short(300)(n) for n in v),
}
FIGURES = Check("a figures map (nsd/figures.py: size_bytes, size_of, forms, input, notes)",
                lambda v: _exactly(v, _FIGURES))
HARDWARE = Check("a hardware map {cpu, cores, isa, label}", lambda v: _exactly(v, {
    "cpu": _short(256), "cores": lambda c: _count(c, MAX_CORES) and c >= 1,
    "isa": lambda f: isinstance(f, list) and len(f) <= 32 and all(isinstance(x, str) and ISA_FLAG.fullmatch(x)
                                                                   for x in f),
    "label": lambda x: x is None or (isinstance(x, str) and HARDWARE_LABEL.fullmatch(x) is not None)}))

RESULT_FIELDS: dict[str, Check] = {  # a RESULT body, also each entry of READY's outbox
    "trial_id": text(40, JOB_ID), "attempt": ATTEMPT, "ok": BOOL,
}
RESULT_OPTIONAL: dict[str, Check] = {
    "metric": OPT_NUMBER, "baseline": OPT_NUMBER, "seconds": OPT_NUMBER, "quantize_s": OPT_NUMBER,
    "recover_s": OPT_NUMBER,  # the quantized model's float weights, recovered at once (nsd.quant.unpack)
    "eval_s": OPT_NUMBER, "error": text(MAX_TEXT), "log": text(MAX_TEXT), "requeue": BOOL,
    "handback": BOOL,
    "artifact": text(64, SHA256), "configs": listof(MAX_CONFIGS, PLANNED),
    "ops": JSON_MAP,  # a plan's op lists per config family (shape checked by nsd.broker.search.parse_oplists)
    # early stop (nsd.quant.scoring), the winner kept on its worker (runner.keep_model)
    "bound": OPT_NUMBER, "stopped_early": BOOL, "batches": integer(0, 1 << 31), "kept": text(4096),
    "low": OPT_NUMBER, "high": OPT_NUMBER,  # the interval a stopped trial's full metric lies in (null: unbounded)
    "requantized": BOOL,
    # deployment figures (a plan's: FP32; a trial's: its deployed form), and a trial not evaluated because
    # its figures already lost to a passing trial's by more than the objective's margin
    "figures": FIGURES, "pruned": BOOL,
}


def _result_ok(v: Any) -> bool:
    return isinstance(v, dict) and _problem(v, RESULT_FIELDS, RESULT_OPTIONAL) is None


OUTBOX_ENTRY = Check("a result map", _result_ok)


LSN = integer(0, MAX_LSN)
EPOCH = integer(0, MAX_LSN)
PAIR_ROLE = text(16, re.compile(r"primary|backup"))
PAIR_STATE = text(16, re.compile(r"pending|passive|active|solo|cut-off"))
FETCHABLE = text(16, re.compile(r"snapshot|blob"))
SNAPSHOT_ID = re.compile(r"[0-9a-f]{32}")
SHA_LIST = listof(1000, text(64, SHA256))
# Every client request may carry these (a broker pair, README "A broker pair"): the highest epoch the
# client has seen, and whether it came here because the other broker did not answer.
CLIENT_OPTIONAL: dict[str, Check] = {"epoch": EPOCH, "failover": BOOL}

# Required fields (and optional ones, checked when present) for each body. Extra fields are allowed,
# so that a newer peer can add some; handlers read only checked fields.
SHAPES: dict[Cmd, dict[str, Check]] = {
    Cmd.READY: {"worker_id": text(128, PEER_NAME), "boot_id": text(64), "host": text(255),
                "cores": integer(1, MAX_CORES), "slots": integer(0, MAX_CORES), "version": integer(0, 1 << 31),
                "running": listof(MAX_LEASES, LEASE), "outbox": listof(MAX_OUTBOX, OUTBOX_ENTRY)},
    Cmd.HEARTBEAT: {},
    Cmd.RESULT: RESULT_FIELDS,
    Cmd.BYE: {},
    Cmd.FETCH: {"sha256": text(64, SHA256), "offset": integer(0, MAX_BLOB_OFFSET),
                "length": integer(0, MAX_CHUNK_BYTES)},
    Cmd.STORE: {"sha256": text(64, SHA256), "offset": integer(0, MAX_BLOB_OFFSET),
                "size": integer(0, MAX_BLOB_OFFSET), "data": of_type(bytes, "bytes")},
    Cmd.READY_ACK: {"heartbeat_s": NUMBER},
    Cmd.ASSIGN: {"trial_id": text(40, JOB_ID), "attempt": ATTEMPT, "job": MAP},
    Cmd.RESULT_ACK: {"trial_id": text(40, JOB_ID), "attempt": ATTEMPT},
    Cmd.CANCEL: {"trial_id": text(40, JOB_ID), "attempt": ATTEMPT},
    Cmd.DISCONNECT: {"reason": text(MAX_TEXT)},
    Cmd.CHUNK: {"sha256": text(64, SHA256), "offset": integer(0, MAX_BLOB_OFFSET)},
    Cmd.STORE_ACK: {"sha256": text(64, SHA256), "offset": integer(0, MAX_BLOB_OFFSET)},
    Cmd.DROP: {"sha256": listof(MAX_DROP, text(64, SHA256)), "tasks": listof(MAX_DROP, text(12, TASK_ID))},
    Cmd.RULE: {"trial_id": text(40, JOB_ID), "attempt": ATTEMPT, "rule": MAP},
    Cmd.HELLO: {"req": integer(0, 1 << 62)},
    Cmd.SUBMIT: {"req": integer(0, 1 << 62), "spec": JSON_MAP},
    Cmd.STATUS: {"req": integer(0, 1 << 62), "task_id": text(64)},
    Cmd.LIST: {"req": integer(0, 1 << 62)},
    Cmd.CANCEL_TASK: {"req": integer(0, 1 << 62), "task_id": text(64)},
    Cmd.RESULT_GET: {"req": integer(0, 1 << 62), "task_id": text(64)},
    Cmd.CLUSTER: {"req": integer(0, 1 << 62)},
    Cmd.BLOB_HAVE: {"req": integer(0, 1 << 62), "sha256": listof(1000, text(64, SHA256))},
    Cmd.BLOB_PUT: {"req": integer(0, 1 << 62), "sha256": text(64, SHA256), "offset": integer(0, MAX_BLOB_OFFSET),
                   "size": integer(0, MAX_BLOB_OFFSET), "data": of_type(bytes, "bytes")},
    Cmd.BLOB_GET: {"req": integer(0, 1 << 62), "sha256": text(64, SHA256), "offset": integer(0, MAX_BLOB_OFFSET),
                   "length": integer(0, MAX_CHUNK_BYTES)},
    Cmd.LOGS: {"req": integer(0, 1 << 62), "task_id": text(64)},
    Cmd.DELETE_TASK: {"req": integer(0, 1 << 62), "task_id": text(64)},
    Cmd.AUDIT: {"req": integer(0, 1 << 62)}, Cmd.CACHE_PURGE: {"req": integer(0, 1 << 62)},
    Cmd.REPLY: {"req": integer(0, 1 << 62)},
    Cmd.ERROR: {"req": integer(0, 1 << 62), "error": of_type(str, "a string")},
    Cmd.EVENT: {"task_id": of_type(str, "a string"), "seq": integer(0, 1 << 62), "kind": of_type(str, "a string")},
    Cmd.PEER_STATE: {"role": PAIR_ROLE, "state": PAIR_STATE, "epoch": EPOCH, "lsn": LSN, "caught_up": BOOL,
                     "workers": integer(0, 1 << 31), "version": integer(0, 1 << 31), "schema": text(64),
                     "hears_you": BOOL},  # I heard you within half the window
    Cmd.PEER_TX: {"epoch": EPOCH, "lsn": LSN, "part": integer(0, 1 << 20), "last": BOOL,
                  "tables": Check("a map of table names to column names", sql_tables),
                  "rows": listof(MAX_TX_ROWS, Check("a [table, rowid, values] row", sql_row))},
    Cmd.PEER_ACK: {"epoch": EPOCH, "lsn": LSN},
    Cmd.PEER_SNAPSHOT: {"id": text(32, SNAPSHOT_ID), "epoch": EPOCH, "lsn": LSN,
                        "size": integer(0, MAX_BLOB_OFFSET), "sha256": text(64, SHA256)},
    Cmd.PEER_FETCH: {"kind": FETCHABLE, "name": text(64), "offset": integer(0, MAX_BLOB_OFFSET),
                     "length": integer(0, MAX_CHUNK_BYTES)},
    Cmd.PEER_CHUNK: {"kind": FETCHABLE, "name": text(64), "offset": integer(0, MAX_BLOB_OFFSET)},
    Cmd.PEER_BLOBS: {"sha256": SHA_LIST},
    Cmd.PEER_HAVE: {"sha256": SHA_LIST},
    Cmd.PEER_LIST: {"after": Check("an empty string or a sha256", lambda v: v == "" or text(64, SHA256).ok(v))},
}
OPTIONAL: dict[Cmd, dict[str, Check]] = {
    Cmd.READY: {"draining": BOOL, "cores_per_trial": integer(1, MAX_CORES), "nsd_version": text(64),
                "versions": Check("a map of up to 16 package names to versions", lambda v: isinstance(v, dict)
                                  and len(v) <= 16 and all(text(64).ok(k) and text(64).ok(x) for k, x in v.items())),
                "hardware": HARDWARE},
    Cmd.HEARTBEAT: {"running": listof(MAX_LEASES, LEASE)},
    Cmd.BYE: {"handback": BOOL},
    Cmd.RESULT: RESULT_OPTIONAL,
    Cmd.LOGS: {"job": Check("null or a job name", lambda v: v is None or text(32, JOB_NAME).ok(v))},
    # submit_id: a retried SUBMIT gets the same task; code: from a gateway, its user may submit python recipes
    Cmd.SUBMIT: {"submit_id": text(32, re.compile(r"[0-9a-f]{32}")), "code": BOOL},
    Cmd.REPLY: {"epoch": EPOCH},
    Cmd.ERROR: {"epoch": EPOCH, "not_active": BOOL},  # not_active: a passive broker; ask the other one
    Cmd.READY_ACK: {"epoch": EPOCH},
    Cmd.DISCONNECT: {"not_active": BOOL},
    Cmd.PEER_CHUNK: {"size": integer(0, MAX_BLOB_OFFSET), "data": of_type(bytes, "bytes"), "error": text(MAX_TEXT)},
    Cmd.PEER_BLOBS: {"listing": BOOL, "more": BOOL},  # listing: an answer to PEER_LIST (more: ask again)
    Cmd.PEER_STATE: {"nsd_version": text(64), "resync": BOOL},  # resync: my copy failed; send a snapshot
    Cmd.STATUS: {"offset": integer(0, 1 << 31), "limit": integer(1, MAX_PAGE)},  # a page of the task's trials
    Cmd.RESULT_GET: {"offset": integer(0, 1 << 31), "limit": integer(1, MAX_PAGE)},
    Cmd.AUDIT: {"task_id": text(64), "owner": text(64, TENANT), "limit": integer(1, 1000), "before": integer(0, 1 << 62)},
    Cmd.CACHE_PURGE: {"task_id": text(64), "worker": text(128, PEER_NAME), "all": BOOL},
}
for _cmd in (Cmd.HELLO, Cmd.SUBMIT, Cmd.STATUS, Cmd.LIST, Cmd.CANCEL_TASK, Cmd.RESULT_GET, Cmd.CLUSTER,
             Cmd.BLOB_HAVE, Cmd.BLOB_PUT, Cmd.BLOB_GET, Cmd.LOGS, Cmd.DELETE_TASK, Cmd.AUDIT, Cmd.CACHE_PURGE):
    OPTIONAL[_cmd] = {**OPTIONAL.get(_cmd, {}), **CLIENT_OPTIONAL}
OPTIONAL[Cmd.READY] = {**OPTIONAL[Cmd.READY], **CLIENT_OPTIONAL}
# The largest body each message may have (the sockets' MAXMSGSIZE is the bound for a whole message).
_SMALL = 64 * 1024
MAX_BODY: dict[Cmd, int] = {cmd: _SMALL for cmd in Cmd}
MAX_BODY.update({Cmd.SUBMIT: 256 * 1024, Cmd.BLOB_PUT: MAX_CHUNK_BYTES + 1024, Cmd.STORE: MAX_CHUNK_BYTES + 1024,
                 Cmd.RESULT: 8 * 1024 * 1024, Cmd.READY: MAX_MESSAGE_BYTES, Cmd.BLOB_HAVE: 128 * 1024,
                 # broker -> peers: a chunk, a job with its spec, a task with all its trials
                 Cmd.CHUNK: MAX_CHUNK_BYTES + 1024, Cmd.ASSIGN: 1024 * 1024, Cmd.REPLY: MAX_MESSAGE_BYTES,
                 Cmd.EVENT: MAX_MESSAGE_BYTES, Cmd.DROP: 256 * 1024,
                 # the pair's link: a transaction's part, a chunk, a page of blob names
                 Cmd.PEER_TX: MAX_MESSAGE_BYTES - 65536, Cmd.PEER_CHUNK: MAX_CHUNK_BYTES + 1024,
                 Cmd.PEER_BLOBS: 128 * 1024, Cmd.PEER_HAVE: 128 * 1024})
MAX_SPEC_BYTES = MAX_BODY[Cmd.SUBMIT] - 1024  # a task spec, packed (the client checks before sending)


def _problem(body: dict, required: dict[str, Check], optional: dict[str, Check]) -> str | None:
    for name, check in required.items():
        if name not in body:
            return f"missing field {name!r}"
        if not check.ok(body[name]):
            return f"field {name!r} has the wrong type or value: not {check.what}"
    for name, check in optional.items():
        if name in body and not check.ok(body[name]):
            return f"field {name!r} has the wrong type or value: not {check.what}"
    return None


def parse_job_id(value: str) -> tuple[str, JobRef]:
    """(task id, job) of a checked job id; ValueError for anything else."""
    match = JOB_ID.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"not a job id: {str(value)[:40]!r}")
    task_id, name = match.groups()
    return task_id, parse_job_name(name)


WORKER_TO_BROKER = frozenset({Cmd.READY, Cmd.HEARTBEAT, Cmd.RESULT, Cmd.BYE, Cmd.FETCH, Cmd.STORE})
BROKER_TO_WORKER = frozenset({Cmd.READY_ACK, Cmd.ASSIGN, Cmd.RESULT_ACK, Cmd.CANCEL,
                              Cmd.HEARTBEAT, Cmd.DISCONNECT, Cmd.CHUNK, Cmd.STORE_ACK, Cmd.DROP, Cmd.RULE})
CLIENT_TO_BROKER = frozenset({Cmd.HELLO, Cmd.SUBMIT, Cmd.STATUS, Cmd.LIST, Cmd.CANCEL_TASK,
                              Cmd.RESULT_GET, Cmd.CLUSTER, Cmd.BLOB_HAVE, Cmd.BLOB_PUT, Cmd.BLOB_GET,
                              Cmd.LOGS, Cmd.DELETE_TASK, Cmd.AUDIT, Cmd.CACHE_PURGE})
for _cmd in CLIENT_TO_BROKER:  # any client request may name its tenant: honoured from gateway keys only
    OPTIONAL.setdefault(_cmd, {})["tenant"] = text(64, TENANT)
BROKER_TO_CLIENT = frozenset({Cmd.REPLY, Cmd.ERROR})
PEER_TO_PEER = frozenset({Cmd.PEER_STATE, Cmd.PEER_TX, Cmd.PEER_ACK, Cmd.PEER_SNAPSHOT, Cmd.PEER_FETCH,
                          Cmd.PEER_CHUNK, Cmd.PEER_BLOBS, Cmd.PEER_HAVE, Cmd.PEER_LIST})


class ProtocolError(ValueError):
    """A message that is not nsd's, or not the shape its type requires. `req`: the request id, when the
    body was a map with one (so that a client can be told what was wrong)."""

    def __init__(self, message: str, req: int | None = None):
        super().__init__(message)
        self.req = req


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
    if len(raw) > MAX_BODY[cmd]:
        raise ProtocolError(f"{cmd.name}: body of {len(raw)} bytes is over its limit of {MAX_BODY[cmd]}",
                            _peek_req(raw))
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"body is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise ProtocolError("body must be a map")
    problem = _problem(body, SHAPES[cmd], OPTIONAL.get(cmd, {}))
    if problem is not None:
        req = body.get("req")
        raise ProtocolError(f"{cmd.name}: {problem}", req if integer(0, 1 << 62).ok(req) else None)
    return Message(cmd, body)


def _peek_req(raw: bytes) -> int | None:
    """The `req` of a request too large to decode, read from its first bytes (clients put it first)."""
    try:
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(raw[:64])
        unpacker.read_map_header()
        if unpacker.unpack() == "req":
            req = unpacker.unpack()
            return req if integer(0, 1 << 62).ok(req) else None
    except Exception:  # not a map, or not starting with req: nobody to tell
        pass
    return None


def event_frames(task_id: str, body: dict[str, Any]) -> list[bytes]:
    """An XPUB event: topic first so that SUB filters by task id."""
    return [task_id.encode(), *pack(Cmd.EVENT, body)]
