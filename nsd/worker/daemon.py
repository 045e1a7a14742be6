"""The worker daemon: registers with the broker, takes jobs by credit, runs them in runner processes.

It never imports torch: runners (`nsd.worker.runner`) do the INC work in their own processes, one per
slot, pinned to the slot's cores. Heartbeats come from here, not from the busy runner, so a long trial
never makes the worker look dead. Results stay in an on-disk outbox until the broker acknowledges them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio

from nsd import __version__
from nsd.net import configure, send_now
from nsd.protocol import BROKER_TO_WORKER, PROTOCOL_VERSION, Cmd, ProtocolError, pack, unpack
from nsd.blobs import CHUNK_BYTES, ChunkWriter, pack_tree, parse_ref, sha256_file
from nsd.security import ClientKeys, KeyFileError
from nsd.spec import PATH_FIELDS
from nsd.systemd import notify, watchdog_interval
from nsd.worker import checks, pipe
from nsd.worker.cache import BlobCache
from nsd.versions import installed_versions
from nsd.worker.config import WorkerConfig
from nsd.worker.cores import allocate, numa_nodes

log = logging.getLogger("nsd.worker")


class WorkerRefused(RuntimeError):
    """The broker refused this worker for good (wrong protocol version, inconsistent registration)."""


class RunnerDied(RuntimeError):
    """The runner process ended while it held a job."""


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "runner stopped answering"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"runner killed by {name}{hint}"
    return f"runner exited with code {returncode}"


def runner_env(n_cpus: int, cache_dir: Path | None = None, preload: str = "") -> dict[str, str]:
    """A runner's environment. INC packs RTN weights with numba only where TBB loads (its
    `can_pack_with_numba`): the `tbb` wheel puts libtbb in <venv>/lib, which the dynamic loader searches
    only if LD_LIBRARY_PATH names it before the process starts. numba's threads = the runner's cores; its
    compiled packers are cached under the worker's cache dir (runner.preload); NSD_RUNNER_PRELOAD names
    modules a runner imports before its first job."""
    env = dict(os.environ)
    if cache_dir is not None:
        env.setdefault("NUMBA_CACHE_DIR", str(cache_dir / "numba"))
    if preload:
        env["NSD_RUNNER_PRELOAD"] = preload
    lib = os.path.join(sys.prefix, "lib")
    if os.path.exists(os.path.join(lib, "libtbb.so.12")):
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (lib, env.get("LD_LIBRARY_PATH")) if p)
    env.setdefault("NUMBA_NUM_THREADS", str(n_cpus))
    return env


class Runner:
    """One slot's persistent runner process."""

    def __init__(self, slot: int, cpus: list[int], workdir: Path, log_path: Path, env: dict[str, str] | None = None):
        self.slot, self.cpus, self.workdir, self.log_path = slot, cpus, workdir, log_path
        self.env = env if env is not None else runner_env(len(cpus))
        self.proc: asyncio.subprocess.Process | None = None
        self._ready: asyncio.Future | None = None
        self._lock = asyncio.Lock()
        self._one_job = asyncio.Lock()  # the pipe carries one job at a time (a warm-up, then a trial)

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            # A fresh interpreter (never a fork of a process that holds a zmq Context).
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "nsd.worker.runner", "--cpus", ",".join(map(str, self.cpus)),
                "--workdir", str(self.workdir), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=log_file, start_new_session=True, env=self.env)
        self._ready = asyncio.ensure_future(pipe.read_async(self.proc.stdout))

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def ready(self) -> None:
        """Start the process if it is not running, and wait until it has imported torch and INC."""
        async with self._lock:
            if not self.alive:
                await self.start()
            if await self._ready is None:
                raise RunnerDied(await self._death())

    async def run(self, job: dict) -> dict:
        async with self._one_job:
            return await self._run(job)

    async def _run(self, job: dict) -> dict:
        await self.ready()
        self.proc.stdin.write(pipe.encode(job))
        await self.proc.stdin.drain()
        answer = await pipe.read_async(self.proc.stdout)
        if answer is None:
            raise RunnerDied(await self._death())
        return answer

    async def _death(self) -> str:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 5)
        return describe_exit(self.proc.returncode)

    async def stop(self, kill: bool = False) -> None:
        if not self.alive:
            return
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # its whole session: INC may start children
        else:
            self.proc.stdin.close()  # end of jobs: the runner exits by itself
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


@dataclass
class Slot:
    """A runner pinned to a set of cores, and the job it runs (if any). Slots come and go with the
    shapes of the trials this worker is given: a 4-core trial gets a runner on 4 cores of one node."""
    runner: Runner
    job: tuple[str, int] | None = None  # (trial_id, attempt) it runs
    task: asyncio.Task | None = None
    last_task_id: str | None = None  # whose model its runner has cached
    last_used: float = 0.0

    @property
    def cpus(self) -> tuple[int, ...]:
        return tuple(self.runner.cpus)


class WorkerDaemon:
    def __init__(self, config: WorkerConfig):
        self.config = config
        self.cache_dir = Path(config.cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.worker_id = config.worker_id or self._persistent_id()
        self.boot_id = uuid.uuid4().hex
        if bool(config.curve_key) != bool(config.server_key):
            raise KeyFileError("CURVE needs both this worker's key (--curve-key) and the broker's public key "
                               "(--server-key)")
        self.curve = ClientKeys.load(Path(config.curve_key), Path(config.server_key)) if config.curve_key else None
        self.cpus = list(config.cpus)
        self.nodes = numa_nodes(self.cpus)
        self.default_k = max(1, min(config.cores_per_trial, len(self.cpus)))
        self._runner_ids = itertools.count()
        self.slots: list[Slot] = []
        free = set(self.cpus)
        while (cores := allocate(free, self.nodes, self.default_k)) is not None:  # the default shape, warm
            self.slots.append(self._new_slot(cores))
            free -= set(cores)
        self.blobs = BlobCache(self.cache_dir / "blobs", config.cache_max_bytes)
        self.blobs.clear_partial()
        self._replies: dict[tuple, asyncio.Future] = {}  # ("chunk", sha, offset) / ("store", sha) -> reply
        self.outbox_path = self.cache_dir / f"outbox-{self.worker_id}.json"
        self.outbox: dict[str, dict] = self._load_outbox()  # "trial_id#attempt" -> RESULT body
        self.backlog: list[tuple[str, int, dict]] = []  # jobs assigned while every slot was busy
        self.ctx = zmq.asyncio.Context()
        self.sock: zmq.asyncio.Socket | None = None
        self._stopping = asyncio.Event()
        self._drain_deadline: float | None = None  # set by stop(): finishing what runs, taking nothing new
        self._background: set[asyncio.Task] = set()  # background runner starts and stops
        self._retired: list[Runner] = []  # runners whose cores went to trials of another shape
        self._watchdog_s = watchdog_interval()
        self._last_watchdog = 0.0
        self.registered = asyncio.Event()
        self.fatal: str | None = None
        # The broker's heartbeat interval and liveness (READY_ACK); ours until it has told us its own.
        self.heartbeat_s, self.liveness = config.heartbeat_s, config.liveness
        self.ignored = 0  # broker messages whose values failed a check (logged, then ignored)
        self.versions = installed_versions()
        self.kept_dir = self.cache_dir / "kept"  # passing trials' models, for their save job (runner.keep_model)

    def _new_slot(self, cores: tuple[int, ...]) -> Slot:
        i = next(self._runner_ids)
        return Slot(Runner(i, list(cores), self.cache_dir / "scratch" / f"runner{i}",
                           self.cache_dir / "logs" / f"{self.worker_id}-runner{i}.log",
                           runner_env(len(cores), self.cache_dir, self.config.preload)))

    @property
    def capacity(self) -> int:
        """Trials of the default shape this worker can run at once (its advertised slots)."""
        return max(1, len(self.cpus) // self.default_k)

    def _persistent_id(self) -> str:
        """Stable across restarts, so that the broker's ROUTER_HANDOVER hands the old identity over."""
        path = self.cache_dir / "worker-id"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            wid = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
            path.write_text(wid)
            return wid

    # ---- outbox ----------------------------------------------------------------------------------

    def _load_outbox(self) -> dict[str, dict]:
        try:
            data = json.loads(self.outbox_path.read_text())
            return data if isinstance(data, dict) else {}
        except (FileNotFoundError, ValueError):
            return {}

    def _save_outbox(self) -> None:
        tmp = self.outbox_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.outbox))
        os.replace(tmp, self.outbox_path)

    # ---- main loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until stop(); reconnect with backoff whenever the broker goes quiet."""
        await asyncio.gather(*(s.runner.start() for s in self.slots))  # warm: imports paid before work arrives
        notify("READY=1", f"STATUS=connecting to {self.config.broker}")
        backoff = self.config.heartbeat_s
        try:
            while not self._stopping.is_set() and self.fatal is None:
                healthy = await self._session()
                if self._stopping.is_set() or self.fatal:
                    break
                backoff = self.config.heartbeat_s if healthy else min(backoff * 2, self.config.backoff_max_s)
                log.warning("lost the broker at %s; reconnecting in %.0fs", self.config.broker, backoff)
                notify(f"STATUS=lost the broker at {self.config.broker}; reconnecting")
                if self._drained():
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff)
        finally:
            await self._shutdown()
        if self.fatal:
            raise WorkerRefused(self.fatal)

    def stop(self, grace_s: float | None = None) -> None:
        """Drain: take no new jobs, give running ones `grace_s` (default config.grace_s) to finish and be
        acknowledged, hand the rest back to the broker, then exit. A second call stops at once."""
        grace = self.config.grace_s if grace_s is None else grace_s
        if self._drain_deadline is not None or grace <= 0:
            self._stopping.set()
            return
        log.info("draining: no new jobs; waiting up to %.0fs for %d running", grace,
                 sum(s.job is not None for s in self.slots))
        self._drain_deadline = time.monotonic() + grace

    def _drained(self) -> bool:
        """While draining: True once nothing runs and every result is acknowledged, or time is up."""
        if self._drain_deadline is None:
            return False
        idle = not any(s.job for s in self.slots) and not self.outbox
        return idle or time.monotonic() > self._drain_deadline

    async def _session(self) -> bool:
        """One connection to the broker. Returns whether it got as far as being registered."""
        self.registered.clear()
        self.sock = configure(self.ctx.socket(zmq.DEALER))
        self.sock.setsockopt(zmq.IDENTITY, self.worker_id.encode())
        if self.curve is not None:
            self.curve.apply(self.sock)
        self.sock.connect(self.config.broker)
        self.heartbeat_s, self.liveness = self.config.heartbeat_s, self.config.liveness
        last_heard = time.monotonic()
        last_sent = 0.0
        was_registered = False
        drain_announced = False
        self._send(Cmd.READY, self._ready_body())
        try:
            while not self._stopping.is_set() and self.fatal is None:
                if self._drain_deadline is not None:
                    if not drain_announced and self.registered.is_set():
                        # Registering again with no slots: the broker keeps what runs, assigns nothing
                        # more, and requeues the backlog we drop here.
                        self.backlog.clear()
                        self._send(Cmd.READY, self._ready_body())
                        drain_announced = True
                    if self._drained():
                        self._stopping.set()
                        break
                # Read each turn: READY_ACK may have changed them to the broker's.
                hb, deadline = self.heartbeat_s, self.heartbeat_s * self.liveness
                # At most a second: the systemd watchdog is fed from this loop, whatever the interval.
                if await self.sock.poll(timeout=int(min(hb / 2, 1.0) * 1000)):
                    frames = await self.sock.recv_multipart()
                    last_heard = time.monotonic()
                    try:
                        msg = unpack(frames, BROKER_TO_WORKER)
                    except ProtocolError as exc:  # refused by the protocol's own field checks
                        self.ignored += 1
                        if self.ignored <= 20 or self.ignored % 1000 == 0:
                            log.warning("dropped a bad message from the broker: %s", exc)
                        continue
                    try:
                        await self._handle(msg)
                    except Exception:  # a value no check foresaw: one message lost, never the daemon
                        self.ignored += 1
                        log.exception("could not act on %s from the broker; ignored", msg.cmd.name)
                    was_registered = was_registered or self.registered.is_set()
                now = time.monotonic()
                if now - last_heard > deadline:
                    return was_registered
                if self.registered.is_set() and now - last_sent >= hb:
                    self._send(Cmd.HEARTBEAT, {"running": self._running()})
                    last_sent = now
                if self._watchdog_s is not None and now - self._last_watchdog >= self._watchdog_s:
                    self._last_watchdog = now  # from this loop: a wedged loop gets the daemon restarted
                    busy = sum(s.job is not None for s in self.slots)
                    notify("WATCHDOG=1", f"STATUS={'registered with' if self.registered.is_set() else 'connecting to'} "
                                         f"{self.config.broker}; {busy} trials running on {len(self.cpus)} cores")
            if self._stopping.is_set() and self.registered.is_set():
                # Leaving on purpose (drain over, or a second SIGTERM): what we still hold is handed back,
                # not failed, so the broker requeues it without using up an attempt.
                self._send(Cmd.BYE, {"handback": True})
            return was_registered
        finally:
            self.sock.close(linger=200)
            self.sock = None

    def _ready_body(self) -> dict:
        return {"worker_id": self.worker_id, "boot_id": self.boot_id, "host": socket.gethostname(),
                "cores": len(self.cpus), "slots": 0 if self._drain_deadline is not None else self.capacity,
                "cores_per_trial": self.default_k,
                "version": PROTOCOL_VERSION,
                "nsd_version": __version__, "running": self._running(), "outbox": list(self.outbox.values()),
                "draining": self._drain_deadline is not None,
                "versions": self.versions}  # what its runners import: part of the broker's metric cache key

    def _running(self) -> list[list]:
        return [list(s.job) for s in self.slots if s.job] + [[t, a] for t, a, _ in self.backlog]

    def _send(self, cmd: Cmd, body: dict) -> None:
        if self.sock is None:
            return
        if not send_now(self.sock, pack(cmd, body)):
            log.debug("send %s failed", cmd.name)

    def _ignore(self, msg, why: str) -> None:
        self.ignored += 1
        if self.ignored <= 20 or self.ignored % 1000 == 0:  # a flood of bad messages must not fill the log
            log.warning("ignored %s from the broker: %s (%d ignored so far)", msg.cmd.name, why[:500], self.ignored)

    async def _handle(self, msg) -> None:
        """Act on one broker message, each field's value checked first (nsd.worker.checks)."""
        body = msg.body
        if msg.cmd in (Cmd.ASSIGN, Cmd.CANCEL, Cmd.RESULT_ACK):
            if (why := checks.lease(body["trial_id"], body["attempt"])) is not None:
                return self._ignore(msg, why)
        if msg.cmd is Cmd.READY_ACK:
            # Adopt the broker's timing: it declares us dead after heartbeat_s * liveness of silence and
            # pings at heartbeat_s, so our deadline and our own period must be the same numbers.
            liveness = body.get("liveness", self.liveness)
            if (why := checks.timing(body["heartbeat_s"], liveness)) is not None:
                self._ignore(msg, f"{why}; keeping {self.heartbeat_s:g}s x {self.liveness}")
            else:
                self.heartbeat_s, self.liveness = float(body["heartbeat_s"]), liveness
            self.registered.set()
            log.info("registered with %s as %s (%d cores, %d slots of %d)", self.config.broker, self.worker_id,
                     len(self.cpus), self.capacity, self.default_k)
            notify(f"STATUS=registered with {self.config.broker}; {self.capacity} slots")
        elif msg.cmd is Cmd.ASSIGN:
            if (why := checks.job(body["trial_id"], body["job"])) is not None:
                self._ignore(msg, f"{body['trial_id']}: {why}")
                # Answered, not dropped: else the broker would wait on this lease for as long as we live.
                self._send(Cmd.RESULT, {"trial_id": body["trial_id"], "attempt": body["attempt"], "ok": False,
                                        "worker_id": self.worker_id, "error": f"the worker refused the job: {why}"})
                return
            self._accept(body["trial_id"], body["attempt"], body["job"])
        elif msg.cmd is Cmd.RESULT_ACK:
            if self.outbox.pop(f"{body['trial_id']}#{body['attempt']}", None) is not None:
                self._save_outbox()
        elif msg.cmd is Cmd.CANCEL:
            await self._cancel(body["trial_id"], body["attempt"])
        elif msg.cmd in (Cmd.CHUNK, Cmd.STORE_ACK):
            why = checks.chunk(body, self.config.cache_max_bytes) if msg.cmd is Cmd.CHUNK else checks.store_ack(body)
            if why is not None:
                self._ignore(msg, why)
                # A transfer waiting on this reply fails now with the reason, rather than at its timeout.
                body = {"error": f"bad {msg.cmd.name} from the broker: {why}"}
            key = ("chunk", msg.body["sha256"], msg.body["offset"]) if msg.cmd is Cmd.CHUNK \
                else ("store", msg.body["sha256"])
            waiter = self._replies.pop(key, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(body)
        elif msg.cmd is Cmd.DISCONNECT:
            if (why := checks.disconnect(body)) is not None:
                return self._ignore(msg, why)
            if body.get("fatal"):
                self.fatal = f"the broker refused this worker: {body['reason'][:500]}"
                log.error(self.fatal)
            else:
                log.info("broker asked us to register again: %s", body["reason"][:500])
                self.registered.clear()
                self._send(Cmd.READY, self._ready_body())
        # HEARTBEAT: hearing it is all it is for.

    def _accept(self, trial_id: str, attempt: int, job: dict) -> None:
        if self._drain_deadline is not None:
            return  # crossed our drain notice: the lease goes back to the broker with our BYE
        if any(s.job == (trial_id, attempt) for s in self.slots) or any(
                (t, a) == (trial_id, attempt) for t, a, _ in self.backlog):
            return  # a duplicate ASSIGN: we already run it
        slot = self._slot_for(job)
        if slot is None:
            self.backlog.append((trial_id, attempt, job))
            return
        slot.job, slot.last_task_id, slot.last_used = (trial_id, attempt), job["task_id"], time.monotonic()
        slot.task = asyncio.create_task(self._execute(slot, trial_id, attempt, job))

    def _slot_for(self, job: dict) -> Slot | None:
        """A runner on `job["cores"]` free cores: an idle one of that shape (one that has this task's model
        cached first), else a new one on freshly allocated cores, retiring idle runners in its way."""
        k = max(1, min(int(job.get("cores") or self.default_k), len(self.cpus)))
        free = set(self.cpus) - {c for s in self.slots if s.job for c in s.cpus}
        idle = sorted((s for s in self.slots if s.job is None and len(s.cpus) == k),
                      key=lambda s: (s.last_task_id != job["task_id"], -s.last_used))
        cores = allocate(free, self.nodes, k, [s.cpus for s in idle])
        if cores is None:
            return None
        reuse = next((s for s in idle if s.cpus == cores), None)
        if reuse is not None:
            return reuse
        for old in [s for s in self.slots if s.job is None and set(s.cpus) & set(cores)]:
            self._retire(old)  # its cores are needed by a trial of another shape
        slot = self._new_slot(cores)
        self.slots.append(slot)
        for old in sorted((s for s in self.slots if s.job is None and s is not slot), key=lambda s: s.last_used):
            if len(self.slots) <= len(self.cpus):
                break
            self._retire(old)  # at most one runner process per core
        return slot

    def _retire(self, slot: Slot) -> None:
        self.slots.remove(slot)
        self._retired.append(slot.runner)
        task = asyncio.create_task(slot.runner.stop())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _execute(self, slot: Slot, trial_id: str, attempt: int, job: dict) -> None:
        pins: list[str] = []
        try:
            try:
                job = await self._materialize(job, pins)
            except Exception as exc:  # not the job's fault: the broker runs it again (attempt + 1)
                log.warning("could not fetch the files of %s: %s", trial_id, exc)
                answer = {"ok": False, "requeue": True, "error": f"worker could not fetch the task's files: {exc}"}
            else:
                if job["kind"] == "plan":
                    self._warm_others(slot, job)
                answer = await self._run(slot, trial_id, attempt, job)
            result = {**answer, "trial_id": trial_id, "attempt": attempt, "worker_id": self.worker_id}
            self.outbox[f"{trial_id}#{attempt}"] = result
            self._save_outbox()
            self._send(Cmd.RESULT, result)
        finally:
            slot.job, slot.task = None, None
            self._warm_up(slot)
            for sha in pins:
                self.blobs.unpin(sha)
            self.blobs.evict()
            if self.backlog and not self._stopping.is_set():
                waiting, self.backlog = self.backlog, []
                for item in waiting:  # in order; what still does not fit waits again
                    self._accept(*item)

    async def _run(self, slot: Slot, trial_id: str, attempt: int, job: dict) -> dict:
        task_id, _, index = trial_id.partition("/")
        log_path = self.cache_dir / "logs" / task_id / f"{index}-a{attempt}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        job = {**job, "log": str(log_path)}
        if job["kind"] == "trial" and job.get("keep"):
            job["keep_dir"] = str(self._keep_dir(task_id, index, attempt))
        if job.get("kept") and not Path(job["kept"]).resolve().is_relative_to((self.kept_dir / task_id).resolve()):
            job.pop("kept")  # only a folder this worker kept for this task is uploaded as its artifact
        limit = None
        if job["kind"] == "trial" and job["spec"]["tuning"].get("trial_timeout_s"):
            limit = job["spec"]["tuning"]["trial_timeout_s"]
        try:
            await slot.runner.ready()  # a runner's start-up is not the trial's time
            try:
                answer = await asyncio.wait_for(slot.runner.run(job), limit)
            except asyncio.TimeoutError:
                await slot.runner.stop(kill=True)  # a hung trial cannot be interrupted: end its runner
                raise RunnerDied(f"trial exceeded trial_timeout_s={limit:g}s; its runner was killed") from None
            if job["kind"] == "save" and answer.get("ok"):
                answer["artifact"] = await self._upload(Path(answer.pop("artifact_dir")))
            if job["kind"] == "save":  # the task is decided: models its trials kept here are of no more use
                shutil.rmtree(self.kept_dir / task_id, ignore_errors=True)
        except RunnerDied as exc:
            answer = {"ok": False, "error": f"{exc} while running {job['kind']} {trial_id}"}
        except (OSError, ValueError, asyncio.TimeoutError) as exc:  # the pipe or an upload broke under us
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        tail = _tail(log_path, LOG_TAIL_BYTES)
        if not answer.get("ok") and tail:
            last = "\n".join(tail.splitlines()[-12:])
            answer["error"] = f"{answer.get('error') or 'failed'}\n--- last lines of its log ---\n{last}"
        answer["log"] = tail
        return answer

    def _keep_dir(self, task_id: str, index: str, attempt: int) -> Path:
        """Where a trial that may win keeps its model. The save job of its task removes the task's folder;
        a task whose save ran elsewhere leaves one here, removed once older than KEPT_MAX_AGE_S."""
        now = time.time()
        with contextlib.suppress(OSError):
            for old in self.kept_dir.iterdir():
                if old.name != task_id and now - old.stat().st_mtime > KEPT_MAX_AGE_S:
                    shutil.rmtree(old, ignore_errors=True)
        return self.kept_dir / task_id / f"{index}-a{attempt}"

    # ---- blobs -----------------------------------------------------------------------------------

    async def _materialize(self, job: dict, pins: list[str]) -> dict:
        """The job with every blob reference in its spec replaced by a path in the local cache."""
        spec = job["spec"]
        refs = [(a, b, parse_ref(spec[a].get(b))) for a, b in PATH_FIELDS if parse_ref(spec[a].get(b))]
        if not refs:
            return job
        spec = {key: dict(value) if isinstance(value, dict) else value for key, value in spec.items()}
        for section, key, (sha, name) in refs:
            self.blobs.pin(sha)
            pins.append(sha)
            spec[section][key] = str(await self.blobs.path(sha, name, self._download))
        return {**job, "spec": spec}

    async def _download(self, sha256: str, dest: Path) -> None:
        """Fetch a blob in chunks, a window of them in flight, verifying its hash; never all in memory."""
        loop = asyncio.get_running_loop()
        size, next_request = None, 0
        pending: dict[int, asyncio.Future] = {}
        with open(dest, "wb") as out:
            blob = ChunkWriter(out, sha256)
            while size is None or blob.offset < size:
                offset = blob.offset
                while len(pending) < (1 if size is None else self.config.fetch_window) and \
                        (size is None and not pending or size is not None and next_request < size):
                    fut = loop.create_future()
                    pending[next_request] = self._replies[("chunk", sha256, next_request)] = fut
                    self._send(Cmd.FETCH, {"sha256": sha256, "offset": next_request, "length": CHUNK_BYTES})
                    next_request += CHUNK_BYTES
                try:
                    body = await asyncio.wait_for(pending.pop(offset), self.config.chunk_timeout_s)
                except asyncio.TimeoutError:
                    for key in [k for k in self._replies if k[:2] == ("chunk", sha256)]:
                        self._replies.pop(key)
                    raise TimeoutError(f"blob {sha256[:12]}…: no chunk at offset {offset}") from None
                if "error" in body:
                    raise ValueError(body["error"])
                data, declared = body.get("data", b""), body.get("size")
                if not isinstance(data, bytes) or not isinstance(declared, int) or size not in (None, declared):
                    raise ValueError(f"blob {sha256[:12]}…: malformed chunk at offset {offset}")
                size = declared
                blob.add(data, size)
            blob.check()

    async def _upload(self, path: Path) -> str:
        """Pack a folder into a blob and store it on the broker, chunk by chunk; returns its sha256."""
        loop = asyncio.get_running_loop()
        tar = path.with_name(path.name + ".tar")
        with open(tar, "wb") as out:
            pack_tree(path, out)
        try:
            sha = sha256_file(tar)
            size = tar.stat().st_size
            offset = 0
            with open(tar, "rb") as f:
                while True:
                    f.seek(offset)
                    data = f.read(CHUNK_BYTES)
                    fut = self._replies[("store", sha)] = loop.create_future()
                    self._send(Cmd.STORE, {"sha256": sha, "offset": offset, "size": size, "data": data})
                    ack = await asyncio.wait_for(fut, self.config.chunk_timeout_s)
                    if "error" in ack:
                        raise ValueError(f"broker refused the artifact: {ack['error']}")
                    offset = ack["offset"]
                    if ack.get("complete"):
                        return sha
        finally:
            tar.unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)

    def _warm_others(self, planning: Slot, job: dict) -> None:
        """While one runner plans a task, the idle ones load its model too: its trials come next, and
        loading it then would hold every first trial up by the model's load time."""
        for slot in self.slots:
            if slot is planning or slot.job is not None or slot.last_task_id == job["task_id"]:
                continue
            slot.last_task_id = job["task_id"]

            async def warm(slot: Slot = slot) -> None:
                with contextlib.suppress(Exception):
                    await slot.runner.run({**job, "kind": "warm"})

            task = asyncio.create_task(warm())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _warm_up(self, slot: Slot) -> None:
        """Replace a runner that died (crash, timeout, cancel) now, not when the next job arrives."""
        if slot.runner.alive or slot not in self.slots or self._stopping.is_set() or self._drain_deadline is not None:
            return

        async def restart() -> None:
            with contextlib.suppress(Exception):
                await slot.runner.ready()

        task = asyncio.create_task(restart())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel(self, trial_id: str, attempt: int) -> None:
        self.backlog = [b for b in self.backlog if (b[0], b[1]) != (trial_id, attempt)]
        for slot in self.slots:
            if slot.job == (trial_id, attempt):
                # INC calls cannot be interrupted: end the runner; the next job starts a fresh one.
                task = slot.task
                task.cancel()
                await slot.runner.stop(kill=True)
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                self._warm_up(slot)
                log.info("cancelled %s (attempt %d)", trial_id, attempt)

    async def _shutdown(self) -> None:
        notify("STOPPING=1")
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for slot in self.slots:
            if slot.task is not None:
                slot.task.cancel()
        await asyncio.gather(*(s.runner.stop(kill=s.job is not None) for s in self.slots),
                             *(r.stop(kill=True) for r in self._retired), return_exceptions=True)
        self.ctx.term()


KEPT_MAX_AGE_S = 3600.0  # a kept model whose task's save job never came here
LOG_TAIL_BYTES = 64 * 1024  # of each job's log, sent with its result (the whole log stays on the worker)


def _tail(path: Path, size: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


