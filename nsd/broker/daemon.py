"""The broker: one asyncio loop around three ZeroMQ sockets and an SQLite store.

ROUTER for clients (request/reply), ROUTER for workers (credit-based job flow, heartbeats), XPUB for
task events. Every decision is delegated to `tuner` and `scheduler`; this module only moves data
between sockets, memory and the store. It never imports torch.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from nsd import __version__
from nsd.broker import scheduler, tuner
from nsd.blobs import make_ref, parse_ref
from nsd.broker.blobs import BlobError, BlobStore
from nsd.broker import metrics as metrics_http
from nsd.broker.metrics import Metrics
from nsd.broker.store import Store
from nsd.net import OncePerPeer, configure, is_loopback, send_now
from nsd.protocol import (CLIENT_TO_BROKER, PROTOCOL_VERSION, WORKER_TO_BROKER, Cmd, ProtocolError, event_frames,
                          pack, unpack)
from nsd.spec import SpecError, spec_blob_refs, validate
from nsd.security import SOCKET_DOMAINS, CurveServer
from nsd.states import TaskState, TrialState
from nsd.systemd import notify, watchdog_interval

log = logging.getLogger("nsd.broker")

PLAN = "plan"  # the job of a `planning` task: load, evaluate FP32 once, expand the config set
SAVE = "save"  # the job of a `finalizing` task: quantize the winner again, save it, upload the artifact
NO_NEW_WORK = frozenset({Cmd.HEARTBEAT, Cmd.FETCH, Cmd.STORE})  # change neither free cores nor demand
LOG_LIMIT = 64 * 1024  # characters of each job's log kept by the broker (the worker keeps the whole file)
STAGE_JOBS = {TaskState.PLANNING: PLAN, TaskState.FINALIZING: SAVE}


def trial_id(task_id: str, index: int | str) -> str:
    return f"{task_id}/{index}"


@dataclass
class Trial:
    index: int
    config: dict
    label: str
    state: TrialState = TrialState.PENDING
    attempt: int = 1
    metric: float | None = None
    worker: str | None = None
    started: float | None = None
    finished: float | None = None
    seconds: float | None = None
    error: str | None = None

    def view(self) -> tuner.TrialView:
        return tuner.TrialView(self.index, self.state, self.metric)

    def public(self) -> dict[str, Any]:
        return {"index": self.index, "config": self.config, "label": self.label, "state": self.state.value,
                "metric": self.metric, "attempt": self.attempt, "worker": self.worker, "seconds": self.seconds,
                "error": self.error}


@dataclass
class Task:
    id: str
    spec: dict
    state: TaskState
    created: float
    started: float | None = None
    finished: float | None = None
    baseline: float | None = None
    winner: int | None = None
    met_goal: bool | None = None
    error: str | None = None
    seq: int = 0
    stage_attempt: int = 1  # attempt of the task-level job (plan or save) of the current state
    stage_worker: str | None = None  # who runs it
    plan_s: float | None = None
    artifact: str | None = None  # blob reference of the saved winner
    trials: list[Trial] = field(default_factory=list)
    # A running tally of the trials, kept by set_state(), so that the hot path (every result, every
    # scheduling pass) never rescans thousands of trials. tuner's pure functions remain the reference:
    # tests/test_broker.py checks this tally against them.
    pending: list[int] = field(default_factory=list)  # heap of PENDING indexes (stale entries are skipped)
    n_pending: int = 0
    n_running: int = 0
    n_unfinished: int = 0
    lowest_passed: int | None = None
    cancelled_above: int | None = None  # the lowest pass whose higher trials were already cancelled

    def index_trials(self) -> None:
        """Rebuild the tally from the trials (after loading them or creating them)."""
        self.pending = sorted(t.index for t in self.trials if t.state is TrialState.PENDING)
        self.n_pending = len(self.pending)
        self.n_running = sum(t.state is TrialState.RUNNING for t in self.trials)
        self.n_unfinished = sum(not t.state.finished for t in self.trials)
        self.lowest_passed = tuner.first_passed(self.views())

    def set_state(self, tr: Trial, state: TrialState) -> None:
        old, tr.state = tr.state, state
        if old is state:
            return
        self.n_pending += (state is TrialState.PENDING) - (old is TrialState.PENDING)
        self.n_running += (state is TrialState.RUNNING) - (old is TrialState.RUNNING)
        self.n_unfinished += (not state.finished) - (not old.finished)
        if state is TrialState.PENDING:
            heapq.heappush(self.pending, tr.index)
        if state is TrialState.PASSED and (self.lowest_passed is None or tr.index < self.lowest_passed):
            self.lowest_passed = tr.index

    def dispatchable(self, limit: int) -> int:
        """How many pending trials may start now under the task's `workers` limit (0: none)."""
        return self.n_pending if limit <= 0 else max(0, min(self.n_pending, limit - self.n_running))

    def next_pending(self) -> Trial:
        """The lowest-index pending trial (INC's order)."""
        while True:
            tr = self.trials[heapq.heappop(self.pending)]
            if tr.state is TrialState.PENDING:
                return tr

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def tuning(self) -> dict:
        return self.spec["tuning"]

    def views(self) -> list[tuner.TrialView]:
        return [t.view() for t in self.trials]

    def goal(self) -> tuner.Goal:
        t = self.tuning
        return tuner.Goal(self.baseline, t["tolerable_loss"], t["criterion"], t["higher_is_better"])

    def summary(self) -> dict[str, Any]:
        done = len(self.trials) - self.n_unfinished
        return {"task_id": self.id, "name": self.name, "state": self.state.value, "created": self.created,
                "trials_done": done, "trials_total": len(self.trials), "met_goal": self.met_goal,
                "winner": self.winner, "error": self.error}

    def public(self) -> dict[str, Any]:
        """The task as clients see it (STATUS, RESULT): stable, documented in the README."""
        winner = self.trials[self.winner] if self.winner is not None else None
        t = self.tuning
        now = time.time()
        return {
            "task_id": self.id, "name": self.name, "state": self.state.value, "seq": self.seq,
            "met_goal": self.met_goal, "baseline": self.baseline, "error": self.error,
            "goal": {"tolerable_loss": t["tolerable_loss"], "criterion": t["criterion"],
                     "higher_is_better": t["higher_is_better"], "max_trials": t["max_trials"]},
            "winner": None if winner is None else {"index": winner.index, "config": winner.config,
                                                   "label": winner.label, "metric": winner.metric},
            "trials": [tr.public() for tr in self.trials],
            "timings": {"created": self.created, "started": self.started, "finished": self.finished,
                        "elapsed_s": ((self.finished or now) - self.started) if self.started else None,
                        "plan_s": self.plan_s,
                        "trial_s_total": sum(tr.seconds or 0.0 for tr in self.trials)},
            "artifact": self.artifact,
            "spec": self.spec,
        }


@dataclass
class Worker:
    id: str
    identity: bytes
    boot_id: str
    host: str
    cores: int
    slots: int
    version: str
    registered: float
    last_seen: float
    last_sent: float = 0.0
    cores_per_trial: int = 1  # the shape of its slots, for tasks that leave cores_per_trial to the worker
    running: dict[str, int] = field(default_factory=dict)  # trial_id -> attempt: the leases it holds
    cores_of: dict[str, int] = field(default_factory=dict)  # trial_id -> cores that job occupies
    cores_used: int = 0  # sum of cores_of
    freed_at: float | None = None  # when a slot last came free (for the dispatch latency metric)

    draining: bool = False  # finishing what it runs before it leaves; takes nothing new

    @property
    def free_cores(self) -> int:
        if self.draining or self.slots <= 0:
            return 0
        return max(0, self.cores - self.cores_used)

    def take(self, tid: str, attempt: int, cores: int) -> None:
        self.release(tid)
        self.running[tid], self.cores_of[tid] = attempt, cores
        self.cores_used += cores

    def release(self, tid: str) -> int | None:
        """Drop a lease; returns its attempt, or None if it held none."""
        self.cores_used -= self.cores_of.pop(tid, 0)
        return self.running.pop(tid, None)

    def public(self, now: float) -> dict[str, Any]:
        state = "draining" if self.draining else "busy" if self.running else "idle"
        return {"worker_id": self.id, "host": self.host, "cores": self.cores, "slots": self.slots,
                "busy": len(self.running), "running": sorted(self.running), "version": self.version,
                "state": state, "registered": self.registered, "last_seen_s": round(now - self.last_seen, 3)}


class Broker:
    def __init__(self, state_dir: Path, clients: str = "tcp://127.0.0.1:5550",
                 workers: str = "tcp://127.0.0.1:5551", events: str = "tcp://127.0.0.1:5552",
                 heartbeat_s: float = 1.0, liveness: int = 5, insecure: bool = False, metrics: str | None = None,
                 curve_secret: Path | None = None, keys_dir: Path | None = None):
        self.state_dir = Path(state_dir)
        # CURVE: every socket encrypted and authenticated, workers and clients from separate allowlists.
        self.curve = CurveServer(Path(curve_secret), Path(keys_dir) if keys_dir else self.state_dir / "keys") \
            if curve_secret else None
        for endpoint in (clients, workers, events):
            if not is_loopback(endpoint) and not insecure and self.curve is None:
                raise ValueError(f"refusing to bind {endpoint}: it is reachable from other hosts and CURVE is not "
                                 f"set up; give --curve-secret (see `nsd keys`), bind 127.0.0.1, or pass "
                                 f"--insecure on a trusted network")
        self.addresses = {"clients": clients, "workers": workers, "events": events}
        self.heartbeat_s, self.liveness = heartbeat_s, liveness
        self.metrics_address = metrics  # "host:port" for Prometheus, or None
        self.metrics = Metrics()
        self._metrics_server: asyncio.AbstractServer | None = None
        self._watchdog_s = watchdog_interval()
        self._last_watchdog = 0.0
        self.tasks: dict[str, Task] = {}
        self.active: dict[str, Task] = {}  # tasks not yet ended, oldest first: what scheduling looks at
        self.workers: dict[str, Worker] = {}
        self.endpoints: dict[str, str] = {}
        self.started_at = time.time()
        self._grace_over = False
        self._bad = OncePerPeer(log)
        self.metrics.bad_messages = lambda: self._bad.count
        self._loops: list[asyncio.Task] = []
        self.ctx: zmq.asyncio.Context | None = None
        self.store: Store | None = None

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.state_dir / "nsd.sqlite3")
        self.blobs = BlobStore(self.state_dir / "blobs")
        self._load()
        self.ctx = zmq.asyncio.Context()
        if self.curve is not None:
            self.curve.start(self.ctx)
        self.clients = configure(self.ctx.socket(zmq.ROUTER))
        self.clients.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unroutable reply raises instead of vanishing
        self.workers_sock = configure(self.ctx.socket(zmq.ROUTER))
        self.workers_sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.workers_sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker takes over its identity
        self.events = configure(self.ctx.socket(zmq.XPUB))
        for name, sock in (("clients", self.clients), ("workers", self.workers_sock), ("events", self.events)):
            if self.curve is not None:
                self.curve.apply(sock, SOCKET_DOMAINS[name])
            sock.bind(self.addresses[name])
            self.endpoints[name] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._loops = [asyncio.create_task(coro) for coro in (
            self._serve(self.clients, CLIENT_TO_BROKER, self._client_message),
            self._serve(self.workers_sock, WORKER_TO_BROKER, self._worker_message),
            self._drain_subscriptions(), self._tick())]
        if self.metrics_address:
            host, _, port = self.metrics_address.rpartition(":")
            self._metrics_server = await metrics_http.serve(host or "127.0.0.1", int(port), self.metrics_page)
            self.endpoints["metrics"] = "http://{}:{}/metrics".format(*self._metrics_server.sockets[0].getsockname()[:2])
        log.info("broker %s serving clients %s, workers %s, events %s (state in %s)", __version__,
                 self.endpoints["clients"], self.endpoints["workers"], self.endpoints["events"], self.state_dir)
        notify("READY=1", f"STATUS=serving clients on {self.endpoints['clients']}")

    async def stop(self) -> None:
        notify("STOPPING=1")
        if self._metrics_server is not None:
            self._metrics_server.close()
            await self._metrics_server.wait_closed()
            self._metrics_server = None
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []
        if self.ctx is not None:
            for sock in (self.clients, self.workers_sock, self.events):
                sock.close(linger=0)
            if self.curve is not None:
                await self.curve.stop()
            self.ctx.term()
            self.ctx = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def reload(self) -> None:
        """Re-read what can change while running: the CURVE key allowlists (new connections only)."""
        if self.curve is not None:
            counts = self.curve.reload()
            log.info("reloaded key allowlists: %s", counts)

    def _load(self) -> None:
        """Reload state after a restart. Running leases stay until their grace window ends (`_tick`)."""
        for row in self.store.tasks():
            task = Task(id=row["id"], spec=json.loads(row["spec"]), state=TaskState(row["state"]),
                        created=row["created"], started=row["started"], finished=row["finished"],
                        baseline=row["baseline"], winner=row["winner"],
                        met_goal=None if row["met_goal"] is None else bool(row["met_goal"]), error=row["error"],
                        seq=row["seq"], stage_attempt=row["stage_attempt"], stage_worker=row["stage_worker"],
                        plan_s=row["plan_s"], artifact=row["artifact"])
            task.trials = [Trial(index=r["idx"], config=json.loads(r["config"]), label=r["label"],
                                 state=TrialState(r["state"]), attempt=r["attempt"], metric=r["metric"],
                                 worker=r["worker"], started=r["started"], finished=r["finished"],
                                 seconds=r["seconds"], error=r["error"]) for r in self.store.trials(task.id)]
            task.index_trials()
            self.tasks[task.id] = task
            if not task.state.terminal:
                self.active[task.id] = task
        if self.tasks:
            log.info("reloaded %d tasks from %s", len(self.tasks), self.state_dir)

    # ---- sockets ---------------------------------------------------------------------------------

    async def _serve(self, sock: zmq.asyncio.Socket, allowed: frozenset[Cmd], handle) -> None:
        """Receive, check, dispatch. A malformed message is counted and dropped, a handler that fails is
        logged: this loop never dies of its input."""
        while True:
            frames = await sock.recv_multipart()
            identity, body = frames[0], frames[1:]
            try:
                msg = unpack(body, allowed)
            except ProtocolError as exc:
                self._bad(identity, str(exc))
                continue
            try:
                handle(identity, msg)
            except Exception:  # a bug of ours must not take the broker down with it
                log.exception("%s failed", msg.cmd.name)
            if msg.cmd not in NO_NEW_WORK:
                self._schedule()
            # A queued message is returned without yielding: let the other socket, the heartbeats and the
            # watchdog run between messages, or a flood on one socket starves everything else.
            await asyncio.sleep(0)

    def _client_message(self, identity: bytes, msg) -> None:
        req = msg.body["req"]
        try:
            answer = self._client_request(identity, msg)
        except (SpecError, LookupError, ValueError) as exc:
            self._reply(identity, Cmd.ERROR, {"req": req, "error": str(exc)})
        except Exception:
            log.exception("request %s failed", msg.cmd.name)
            self._reply(identity, Cmd.ERROR, {"req": req, "error": "internal broker error (see its log)"})
        else:
            self._reply(identity, Cmd.REPLY, {"req": req, **answer})

    async def _drain_subscriptions(self) -> None:
        while True:  # XPUB hands us (un)subscriptions; nothing to do with them but read them
            await self.events.recv_multipart()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s / 2)
            try:
                self._check_liveness(time.time())
                self._check_timeouts(time.time())
                self._schedule()
                self._ping_systemd()
            except Exception:
                log.exception("tick failed")

    def _ping_systemd(self) -> None:
        """WATCHDOG=1 from the loop itself: if the loop wedges, systemd restarts us."""
        now = time.monotonic()
        if self._watchdog_s is not None and now - self._last_watchdog >= self._watchdog_s:
            self._last_watchdog = now
            busy = sum(len(w.running) for w in self.workers.values())
            notify("WATCHDOG=1", f"STATUS={len(self.active)} active tasks, {len(self.workers)} workers, "
                                 f"{busy}/{sum(w.slots for w in self.workers.values())} slots busy")

    def metrics_page(self) -> str:
        by_state: dict[str, int] = {s.value: 0 for s in TaskState}
        for task in self.tasks.values():
            by_state[task.state.value] += 1
        queue = sum((t.state is TaskState.QUEUED) + t.n_pending for t in self.active.values())
        return metrics_http.render(self.metrics, by_state, len(self.workers),
                                   sum(w.slots for w in self.workers.values()),
                                   sum(len(w.running) for w in self.workers.values()), queue)

    def _reply(self, identity: bytes, cmd: Cmd, body: dict) -> None:
        if not send_now(self.clients, [identity, *pack(cmd, body)]):  # client gone or not reading
            log.debug("reply %s to a client dropped", cmd.name)

    def _send_worker(self, worker: Worker, cmd: Cmd, body: dict | None = None) -> bool:
        return self._send_identity(worker.identity, cmd, body, worker)

    def _send_identity(self, identity: bytes, cmd: Cmd, body: dict | None, worker: Worker | None = None) -> bool:
        if not send_now(self.workers_sock, [identity, *pack(cmd, body)]):
            log.debug("send %s to a worker failed", cmd.name)
            return False
        if worker is not None:
            worker.last_sent = time.time()
        return True

    def _emit(self, task: Task, kind: str, **data: Any) -> None:
        task.seq += 1
        body = {"task_id": task.id, "seq": task.seq, "ts": time.time(), "kind": kind, **data}
        self.store.append_event(task.id, task.seq, body)
        send_now(self.events, event_frames(task.id, body))  # a lagging subscriber re-snapshots on the gap

    # ---- clients ---------------------------------------------------------------------------------

    def _client_request(self, identity: bytes, msg) -> dict[str, Any]:
        body = msg.body
        if msg.cmd is Cmd.HELLO:
            return {"protocol": PROTOCOL_VERSION, "version": __version__, "events": self.endpoints["events"]}
        if msg.cmd is Cmd.SUBMIT:
            spec = validate(body["spec"]).to_dict()
            missing = [ref for ref in spec_blob_refs(spec) if not self.blobs.has(parse_ref(ref)[0])]
            if missing:
                raise ValueError(f"blob(s) not uploaded: {', '.join(missing)}; upload them first (BLOB_PUT)")
            return {"task_id": self._submit(spec)}
        if msg.cmd is Cmd.BLOB_HAVE:
            hashes = [h for h in body["sha256"] if isinstance(h, str)][:1000]
            return {"missing": [h for h in hashes if not self.blobs.has(h)]}
        if msg.cmd is Cmd.BLOB_PUT:
            offset, complete = self.blobs.write(identity, body["sha256"], body["offset"], body["size"], body["data"])
            return {"offset": offset, "complete": complete}
        if msg.cmd is Cmd.BLOB_GET:
            data, size = self.blobs.read(body["sha256"], body["offset"], body["length"])
            return {"data": data, "size": size}
        if msg.cmd is Cmd.LIST:
            return {"tasks": [t.summary() for t in self.tasks.values()]}
        if msg.cmd is Cmd.CLUSTER:
            now = time.time()
            return {"workers": [w.public(now) for w in self.workers.values()]}
        task = self._task(body["task_id"])
        if msg.cmd in (Cmd.STATUS, Cmd.RESULT_GET):
            return {"task": task.public()}
        if msg.cmd is Cmd.LOGS:
            job = body.get("job")
            return {"logs": self.store.logs(task.id, None if job is None else str(job))}
        if msg.cmd is Cmd.CANCEL_TASK:
            if not task.state.terminal:
                with self.store.tx():
                    self._finish(task, TaskState.CANCELLED, error="cancelled by user")
            return {"task": task.summary()}
        raise ValueError(f"unhandled request {msg.cmd.name}")  # pragma: no cover - CLIENT_TO_BROKER is exhaustive

    def _task(self, task_id: str) -> Task:
        task = self.tasks.get(task_id)
        if task is None:
            matches = [t for t in self.tasks if t.startswith(task_id)] if len(task_id) >= 4 else []
            if len(matches) != 1:
                raise LookupError(f"no task {task_id!r}" if not matches else f"task id {task_id!r} is ambiguous")
            task = self.tasks[matches[0]]
        return task

    def _submit(self, spec: dict) -> str:
        task = Task(id=uuid.uuid4().hex[:12], spec=spec, state=TaskState.QUEUED, created=time.time())
        with self.store.tx():
            self.store.insert_task(task.id, task.name, spec, task.state.value, task.created)
            self.tasks[task.id] = self.active[task.id] = task
            self._emit(task, "state", state=task.state.value)
        log.info("task %s (%s) queued", task.id, task.name)
        return task.id

    # ---- workers ---------------------------------------------------------------------------------

    def _worker_message(self, identity: bytes, msg) -> None:
        now = time.time()
        wid = identity.decode(errors="replace")
        worker = self.workers.get(wid)
        if worker is not None:
            worker.last_seen = now  # any traffic counts as a heartbeat
        if msg.cmd is Cmd.FETCH:
            self._send_identity(identity, Cmd.CHUNK, self._chunk(msg.body), worker)
        elif msg.cmd is Cmd.STORE:
            b = msg.body
            try:
                offset, complete = self.blobs.write(identity, b["sha256"], b["offset"], b["size"], b["data"])
                ack = {"sha256": b["sha256"], "offset": offset, "complete": complete}
            except BlobError as exc:
                ack = {"sha256": b["sha256"], "offset": b["offset"], "error": str(exc)}
            self._send_identity(identity, Cmd.STORE_ACK, ack, worker)
        elif msg.cmd is Cmd.READY:
            self._register(identity, msg.body, now)
        elif msg.cmd is Cmd.RESULT:
            with self.store.tx():
                self._result(worker, msg.body)
            self._send_identity(identity, Cmd.RESULT_ACK,
                                {"trial_id": msg.body["trial_id"], "attempt": msg.body["attempt"]}, worker)
        elif worker is None:
            # A heartbeat or goodbye from a worker we do not know (we restarted, or declared it dead).
            if msg.cmd is not Cmd.BYE:
                self._send_identity(identity, Cmd.DISCONNECT, {"reason": "unknown worker: register again"})
        elif msg.cmd is Cmd.BYE:
            log.info("worker %s said goodbye", wid)
            self._drop_worker(worker, "worker left", handback=msg.body.get("handback") is True)

    def _chunk(self, body: dict) -> dict:
        try:
            data, size = self.blobs.read(body["sha256"], body["offset"], body["length"])
            return {"sha256": body["sha256"], "offset": body["offset"], "size": size, "data": data}
        except BlobError as exc:
            return {"sha256": body["sha256"], "offset": body["offset"], "error": str(exc)}

    def _register(self, identity: bytes, body: dict, now: float) -> None:
        wid = identity.decode(errors="replace")
        if body["version"] != PROTOCOL_VERSION:
            self._send_identity(identity, Cmd.DISCONNECT, {
                "reason": f"protocol version {body['version']} not supported (broker speaks {PROTOCOL_VERSION})",
                "fatal": True})
            return
        if body["worker_id"] != wid or body["slots"] < 0 or body["cores"] < 1:
            self._send_identity(identity, Cmd.DISCONNECT, {"reason": "READY fields are inconsistent", "fatal": True})
            return
        still_running = {(str(r[0]), int(r[1])) for r in body["running"]
                         if isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[1], int)}
        old = self.workers.pop(wid, None)
        # The same live process registering again to drain: what it no longer lists it gave back unstarted.
        handback = body.get("draining") is True and old is not None and old.boot_id == body["boot_id"]
        worker = Worker(id=wid, identity=identity, boot_id=body["boot_id"], host=body["host"][:255],
                        cores=body["cores"], slots=body["slots"], version=str(body.get("nsd_version", "?"))[:64],
                        registered=now, last_seen=now, draining=body.get("draining") is True)
        shape = body.get("cores_per_trial")
        worker.cores_per_trial = shape if isinstance(shape, int) and not isinstance(shape, bool) and \
            0 < shape <= worker.cores else max(1, worker.cores // max(1, worker.slots))
        self.workers[wid] = worker
        acks = []
        for result in body["outbox"]:  # results it finished while it could not reach us: before any requeue
            if isinstance(result, dict) and isinstance(result.get("trial_id"), str) \
                    and isinstance(result.get("attempt"), int) and not isinstance(result.get("attempt"), bool):
                with self.store.tx():
                    self._result(worker, result)
                acks.append({"trial_id": result["trial_id"], "attempt": result["attempt"]})
        with self.store.tx():
            # Leases this worker (or its previous incarnation) held: keep those it still runs, requeue the rest.
            for task in list(self.active.values()):
                stage = STAGE_JOBS.get(task.state)
                if stage and task.stage_worker == wid:
                    if (trial_id(task.id, stage), task.stage_attempt) in still_running:
                        worker.take(trial_id(task.id, stage), task.stage_attempt, self._job_cores(task, worker))
                    else:
                        self._lost_lease(task, stage, handback=handback)
                for tr in task.trials:
                    if tr.worker == wid and tr.state is TrialState.RUNNING:
                        if (trial_id(task.id, tr.index), tr.attempt) in still_running:
                            worker.take(trial_id(task.id, tr.index), tr.attempt, self._job_cores(task, worker))
                        else:
                            self._lost_lease(task, tr.index, handback=handback)
        log.info("worker %s registered from %s: %d cores, %d slots%s", wid, worker.host, worker.cores,
                 worker.slots, " (again)" if old else "")
        self._send_worker(worker, Cmd.READY_ACK, {"heartbeat_s": self.heartbeat_s, "liveness": self.liveness})
        for ack in acks:
            self._send_worker(worker, Cmd.RESULT_ACK, ack)
        # Anything it runs that we no longer want (task cancelled or decided meanwhile): stop it.
        for tid, attempt in still_running:
            if worker.running.get(tid) != attempt:
                self._send_worker(worker, Cmd.CANCEL, {"trial_id": tid, "attempt": attempt})

    def _drop_worker(self, worker: Worker, why: str, handback: bool = False) -> None:
        self.workers.pop(worker.id, None)
        with self.store.tx():
            for tid in list(worker.running):
                task_id, _, index = tid.partition("/")
                task = self.tasks.get(task_id)
                if task is not None and not task.state.terminal:
                    self._lost_lease(task, index if index in (PLAN, SAVE) else int(index), why, handback)
        worker.running.clear()
        worker.cores_of.clear()
        worker.cores_used = 0

    def _lost_lease(self, task: Task, index: int | str, why: str = "worker lost", handback: bool = False) -> None:
        """A job's worker died or forgot it: run it again (attempt + 1), or give up after max_attempts.
        `handback`: its worker gave it back on purpose (drain): see _handed_back."""
        if handback:
            self._handed_back(task, index, why)
            return
        max_attempts = task.tuning["max_attempts"]
        if index in (PLAN, SAVE):
            state, attempt = tuner.after_lost_lease(task.stage_attempt, max_attempts)
            if state is TrialState.ERROR and index == PLAN:
                self._finish(task, TaskState.FAILED, error=f"planning failed {attempt} times: {why}")
            elif state is TrialState.ERROR:
                self._finish(task, TaskState.DONE, winner=task.winner, met_goal=task.met_goal,
                             error=f"the winner's artifact could not be saved ({attempt} attempts): {why}")
            else:
                task.stage_attempt, task.stage_worker = attempt, None
                self.store.update_task(task.id, stage_attempt=attempt, stage_worker=None)
                self._emit(task, "state", state=task.state.value, reason=why)
            return
        tr = task.trials[index]
        state, attempt = tuner.after_lost_lease(tr.attempt, max_attempts)
        self.metrics.trials_requeued += state is TrialState.PENDING
        task.set_state(tr, state)
        tr.attempt, tr.worker = attempt, None
        if state is TrialState.ERROR:
            tr.error, tr.finished = f"{why} on each of {attempt} attempts", time.time()
        self.store.update_trial(task.id, index, state=state.value, attempt=attempt, worker=None, error=tr.error,
                                finished=tr.finished)
        self._emit(task, "trial", **self._trial_event(tr))
        self._settle(task)

    def _handed_back(self, task: Task, index: int | str, why: str) -> None:
        """A job its worker gave back unfinished on purpose (a drain whose grace ran out): it did not fail,
        so it is requeued under the same attempt number, using up none of max_attempts. The lease stays
        distinct: a result is accepted only from the worker that holds it (tr.worker / stage_worker)."""
        if index in (PLAN, SAVE):
            task.stage_worker = None
            self.store.update_task(task.id, stage_worker=None)
            self._emit(task, "state", state=task.state.value, reason=f"{why} (handed back)")
            return
        tr = task.trials[index]
        if tr.state is not TrialState.RUNNING:
            return
        self.metrics.trials_requeued += 1
        task.set_state(tr, TrialState.PENDING)
        tr.worker = None
        self.store.update_trial(task.id, index, state=tr.state.value, worker=None)
        self._emit(task, "trial", **self._trial_event(tr))
        self._settle(task)

    def _result(self, worker: Worker | None, body: dict) -> None:
        """Apply a job result at most once: only the lease holder's current attempt counts."""
        task_id, _, index = str(body["trial_id"]).partition("/")
        task = self.tasks.get(task_id)
        if worker is not None and worker.running.get(body["trial_id"]) == body["attempt"]:
            worker.release(body["trial_id"])
            worker.freed_at = time.monotonic()
        if task is None or task.state.terminal:
            return
        wid = worker.id if worker else None
        if index in (PLAN, SAVE):
            if STAGE_JOBS.get(task.state) == index and task.stage_attempt == body["attempt"] \
                    and task.stage_worker == wid:
                task.stage_worker = None
                self._keep_log(task, index, body, wid)
                if body.get("requeue") is True:  # the worker could not get the task's files: not the job's fault
                    self._lost_lease(task, index, str(body.get("error") or "worker could not start the job"))
                elif index == PLAN:
                    self._plan_result(task, body)
                else:
                    self._save_result(task, body)
            return
        try:
            tr = task.trials[int(index)]
        except (ValueError, IndexError):
            return
        if tr.state is not TrialState.RUNNING or tr.attempt != body["attempt"] or tr.worker != wid:
            return  # a duplicate, or a late answer to a lease that was requeued or cancelled
        self._keep_log(task, index, body, wid)
        if body.get("requeue") is True:
            self._lost_lease(task, tr.index, str(body.get("error") or "worker could not start the job"))
            return
        tr.finished = time.time()
        tr.seconds = _number(body.get("seconds"))
        metric = _number(body.get("metric"))
        if body.get("ok") is True and metric is not None:
            tr.metric = metric
            task.set_state(tr, TrialState.PASSED if tuner.meets_goal(metric, task.goal()) else TrialState.FAILED_GOAL)
        else:
            task.set_state(tr, TrialState.ERROR)
            tr.error = str(body.get("error") or "the runner returned no metric")[:4000]
        self.store.update_trial(task.id, tr.index, state=tr.state.value, metric=tr.metric, seconds=tr.seconds,
                                finished=tr.finished, error=tr.error)
        self.metrics.trial_finished(tr.state.value)
        self._emit(task, "trial", **self._trial_event(tr))
        self._settle(task)

    def _keep_log(self, task: Task, job: str, body: dict, worker: str | None) -> None:
        text = body.get("log")
        if isinstance(text, str) and text:
            self.store.put_log(task.id, job, body["attempt"], worker, text[-LOG_LIMIT:])

    def _plan_result(self, task: Task, body: dict) -> None:
        task.plan_s = _number(body.get("seconds"))
        baseline = _number(body.get("baseline"))
        configs = body.get("configs")
        if body.get("ok") is not True:
            self._finish(task, TaskState.FAILED, error=f"planning failed: {body.get('error') or 'unknown error'}")
            return
        if baseline is None or not isinstance(configs, list) or not all(
                isinstance(c, dict) and isinstance(c.get("config"), dict) for c in configs):
            self._finish(task, TaskState.FAILED, error="planning returned a malformed plan")
            return
        if not configs:
            self._finish(task, TaskState.FAILED, error="the config set expanded to no configs")
            return
        configs = configs[: task.tuning["max_trials"]]
        task.baseline = baseline
        task.trials = [Trial(index=i, config=c["config"], label=str(c.get("label", ""))[:500])
                       for i, c in enumerate(configs)]
        task.index_trials()
        task.state, task.stage_attempt = TaskState.TUNING, 1
        self.store.insert_trials(task.id, [(t.index, t.config, t.label, t.state.value) for t in task.trials])
        self.store.update_task(task.id, baseline=baseline, state=task.state.value, stage_worker=None,
                               stage_attempt=1, plan_s=task.plan_s)
        self._emit(task, "plan", baseline=baseline, trials=[{"index": t.index, "config": t.config,
                                                            "label": t.label} for t in task.trials])
        self._emit(task, "state", state=task.state.value)
        log.info("task %s: baseline %.6g, %d trials", task.id, baseline, len(task.trials))

    def _save_result(self, task: Task, body: dict) -> None:
        sha = body.get("artifact")
        if body.get("ok") is True and isinstance(sha, str) and self.blobs.has(sha):
            task.artifact = make_ref(sha, "model")
            self.store.update_task(task.id, artifact=task.artifact)
            self._finish(task, TaskState.DONE, winner=task.winner, met_goal=task.met_goal, error=task.error)
        else:
            why = body.get("error") or "the worker returned no artifact"
            self._finish(task, TaskState.DONE, winner=task.winner, met_goal=task.met_goal,
                         error=f"the winner's artifact could not be saved: {why}")

    def _settle(self, task: Task) -> None:
        """After any trial change: cancel what can no longer win (tuner.to_cancel), and end the task once
        decided (tuner.decide) — which, with those cancelled, is when no trial is left unfinished."""
        passed = task.lowest_passed
        if passed is not None and passed != task.cancelled_above:
            for tr in task.trials[passed + 1:]:
                if not tr.state.finished:
                    self._cancel_trial(task, tr, "a lower-index trial met the goal")
            task.cancelled_above = passed
        if task.n_unfinished == 0:
            self._conclude(task, tuner.decide(task.views(), task.tuning["higher_is_better"]))

    def _conclude(self, task: Task, decision: tuner.Decision, note: str | None = None) -> None:
        """The winner is known: stop the other trials, then save its artifact (`finalizing`)."""
        if decision.winner is None:
            self._finish(task, TaskState.FAILED, error=note or "no trial produced a metric (every trial errored)")
            return
        for tr in task.trials:
            if not tr.state.finished:
                self._cancel_trial(task, tr, "the task is decided")
        task.state, task.winner, task.met_goal, task.error = TaskState.FINALIZING, decision.winner, \
            decision.met_goal, note
        task.stage_attempt, task.stage_worker = 1, None
        self.store.update_task(task.id, state=task.state.value, winner=task.winner, met_goal=task.met_goal,
                               error=note, stage_attempt=1, stage_worker=None)
        self._emit(task, "state", state=task.state.value, winner=task.winner, met_goal=task.met_goal, error=note)

    def _cancel_trial(self, task: Task, tr: Trial, why: str) -> None:
        tid = trial_id(task.id, tr.index)
        if tr.state is TrialState.RUNNING:
            worker = self.workers.get(tr.worker or "")
            if worker is not None and worker.release(tid) is not None:
                self._send_worker(worker, Cmd.CANCEL, {"trial_id": tid, "attempt": tr.attempt})
        task.set_state(tr, TrialState.CANCELLED)
        tr.error, tr.finished = why, time.time()
        self.store.update_trial(task.id, tr.index, state=tr.state.value, error=why, finished=tr.finished)
        self._emit(task, "trial", **self._trial_event(tr))

    def _finish(self, task: Task, state: TaskState, winner: int | None = None, met_goal: bool | None = None,
                error: str | None = None) -> None:
        for tr in task.trials:
            if not tr.state.finished:
                self._cancel_trial(task, tr, "task ended")
        stage = STAGE_JOBS.get(task.state)
        if stage and task.stage_worker:
            worker = self.workers.get(task.stage_worker)
            tid = trial_id(task.id, stage)
            if worker is not None and worker.release(tid) is not None:
                self._send_worker(worker, Cmd.CANCEL, {"trial_id": tid, "attempt": task.stage_attempt})
        task.stage_worker = None
        task.state, task.winner, task.met_goal, task.error = state, winner, met_goal, error
        task.finished = time.time()
        self.active.pop(task.id, None)
        self.store.update_task(task.id, state=state.value, winner=winner, met_goal=met_goal, error=error,
                               finished=task.finished, stage_worker=None)
        self._emit(task, "state", state=state.value, winner=winner, met_goal=met_goal, error=error)
        log.info("task %s %s%s", task.id, state.value,
                 f": winner trial {winner} (met goal: {met_goal})" if winner is not None else
                 f": {error}" if error else "")

    @staticmethod
    def _trial_event(tr: Trial) -> dict[str, Any]:
        return {"index": tr.index, "state": tr.state.value, "metric": tr.metric, "attempt": tr.attempt,
                "worker": tr.worker, "seconds": tr.seconds, "error": tr.error}

    # ---- scheduling and time -----------------------------------------------------------------

    def _schedule(self) -> None:
        demands = []
        for task in self.active.values():
            priority = task.spec["resources"].get("priority", 0)
            cores = task.spec["resources"].get("cores_per_trial", 0)
            if task.state is TaskState.QUEUED or (task.state in STAGE_JOBS and task.stage_worker is None):
                demands.append(scheduler.Demand(task.id, 1, priority, cores=cores))
            elif task.state is TaskState.TUNING:
                wants = task.dispatchable(task.spec["resources"]["workers"])
                if wants:
                    demands.append(scheduler.Demand(task.id, wants, priority, task.n_running, cores))
        if demands:
            free = {w.id: w.free_cores for w in self.workers.values()}
            placements = scheduler.place(free, demands, {w.id: w.cores_per_trial for w in self.workers.values()})
            if placements:
                with self.store.tx():
                    for task_id, worker_id in placements:
                        self._assign(self.tasks[task_id], self.workers[worker_id])
        for worker in self.workers.values():  # a slot that stays free had no work waiting: not latency
            if worker.freed_at is not None and worker.free_cores >= worker.cores_per_trial:
                worker.freed_at = None

    def _assign(self, task: Task, worker: Worker) -> None:
        now = time.time()
        if task.state in (TaskState.QUEUED, TaskState.PLANNING):
            task.state, task.stage_worker = TaskState.PLANNING, worker.id
            task.started = task.started or now
            tid, attempt = trial_id(task.id, PLAN), task.stage_attempt
            job = {"kind": "plan", "task_id": task.id, "spec": task.spec}
            self.store.update_task(task.id, state=task.state.value, stage_worker=worker.id, started=task.started)
            self._emit(task, "state", state=task.state.value, worker=worker.id)
        elif task.state is TaskState.FINALIZING:
            task.stage_worker = worker.id
            tid, attempt = trial_id(task.id, SAVE), task.stage_attempt
            winner = task.trials[task.winner]
            job = {"kind": "save", "task_id": task.id, "spec": task.spec, "index": winner.index,
                   "config": winner.config}
            self.store.update_task(task.id, stage_worker=worker.id)
        else:
            tr = task.next_pending()
            index = tr.index
            task.set_state(tr, TrialState.RUNNING)
            tr.worker, tr.started = worker.id, now
            tid, attempt = trial_id(task.id, index), tr.attempt
            job = {"kind": "trial", "task_id": task.id, "spec": task.spec, "index": index, "config": tr.config}
            self.store.update_trial(task.id, index, state=tr.state.value, worker=worker.id, started=now)
            self._emit(task, "trial", **self._trial_event(tr))
        cores = self._job_cores(task, worker)
        job["cores"] = cores
        worker.take(tid, attempt, cores)
        self.metrics.jobs_dispatched += 1
        if worker.freed_at is not None:
            self.metrics.dispatch_latency.observe(time.monotonic() - worker.freed_at)
            worker.freed_at = None
        if not self._send_worker(worker, Cmd.ASSIGN, {"trial_id": tid, "attempt": attempt, "job": job}):
            self._drop_worker(worker, "worker unreachable")

    @staticmethod
    def _job_cores(task: Task, worker: Worker) -> int:
        return task.spec["resources"].get("cores_per_trial") or worker.cores_per_trial

    def _check_liveness(self, now: float) -> None:
        deadline = self.heartbeat_s * self.liveness
        for worker in list(self.workers.values()):
            if now - worker.last_seen > deadline:
                log.warning("worker %s silent for %.1fs: declared dead", worker.id, now - worker.last_seen)
                self._drop_worker(worker, "worker stopped answering")
            elif now - worker.last_sent >= self.heartbeat_s:
                self._send_worker(worker, Cmd.HEARTBEAT)
        # Leases reloaded from disk whose worker has not come back within one grace window. (Later, a
        # worker that goes away is dropped with its leases at once, so this runs only once.)
        if not self._grace_over and now - self.started_at > deadline:
            self._grace_over = True
            with self.store.tx():
                for task in list(self.active.values()):
                    stage = STAGE_JOBS.get(task.state)
                    if stage and task.stage_worker is not None and task.stage_worker not in self.workers:
                        self._lost_lease(task, stage, "worker did not come back after a broker restart")
                    for tr in task.trials:
                        if tr.state is TrialState.RUNNING and tr.worker not in self.workers:
                            self._lost_lease(task, tr.index, "worker did not come back after a broker restart")

    def _check_timeouts(self, now: float) -> None:
        for task in list(self.active.values()):
            budget = task.tuning["timeout_s"]
            if task.state is TaskState.TUNING and budget and task.started and now - task.started > budget:
                with self.store.tx():
                    decision = tuner.decide(task.views(), task.tuning["higher_is_better"], exhausted=True)
                    self._conclude(task, decision, note=f"wall-clock budget of {budget:g}s ran out")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "nsd" / "broker"
