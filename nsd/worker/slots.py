"""The worker's runner processes: `RunnerProcess` (the worker's handle on one runner child, whose own code
is `nsd.worker.runner`, in its sandbox: `nsd.worker.sandbox`), `Slot` (a runner pinned to cores and the job
it runs) and `SlotPool` (which slots exist: a trial of k cores gets a runner on k cores of one NUMA node,
idle runners in its way are retired). No torch here: the children import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from functools import partial
from typing import Awaitable, Callable, Coroutine

from nsd.worker import pipe
from nsd.worker.cores import allocate, numa_nodes
from nsd.worker.sandbox import Layout, RunnerDirs, bwrap_argv, expose, link_tree, runner_env


class RunnerDied(RuntimeError):
    """The runner process ended while it held a job."""


def describe_exit(returncode: int | None, sandboxed: bool = False) -> str:
    """Why a runner ended. bwrap reports a child killed by signal N as exit code 128 + N."""
    if returncode is None:
        return "runner stopped answering"
    if sandboxed and returncode > 128:
        returncode = 128 - returncode
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"runner killed by {name}{hint}"
    return f"runner exited with code {returncode}"


@dataclass(frozen=True)
class RunnerSetup:
    """What every runner of a worker shares: its sandbox layout (None: runners run unsandboxed), the blob
    cache its jobs' files come from, the numba cache that fresh runners start from, and their settings."""
    layout: Layout | None
    blobs: Path
    numba: Path  # packers compiled by runners before their first job (no recipe code had run in them yet)
    preload: str = ""
    passed_env: tuple[str, ...] = ()


MAX_ANSWER_BYTES = 16 * 1024 * 1024  # a runner's answer (it may be a recipe's doing): more ends the runner


class RunnerProcess:
    """The worker's handle on one slot's persistent runner process (`python -m nsd.worker.runner`), in its
    sandbox (`nsd.worker.sandbox`). A runner where a python recipe ran serves that recipe's task only: a
    job of another task gets a fresh process (nothing a recipe changed in memory or on disk survives);
    built-in recipes are our code, and their runners stay warm across tasks.

    While it runs a job, a runner may ask for its cores to itself (a measurement's timed calls,
    `nsd.quant.deploy.measure_form`): a frame `{"exclusive": true}` before, `{"exclusive": false}` after, each
    answered with `{"paused": n}` once `on_exclusive` has paused (or resumed) the worker's other runners."""

    def __init__(self, cpus: list[int], home: Path, log_path: Path, setup: RunnerSetup,
                 on_exclusive: Callable[[RunnerProcess, bool], Awaitable[int]] | None = None):
        self.cpus, self.log_path, self.setup = list(cpus), log_path, setup
        self.on_exclusive = on_exclusive
        self.dirs = RunnerDirs(Path(os.path.realpath(home)))  # as the runner's own getcwd() names it
        self.env = runner_env(len(cpus), self.dirs.scratch, setup.preload, setup.passed_env)
        self.proc: asyncio.subprocess.Process | None = None
        self.serving: str | None = None  # the task whose python recipe ran in this process
        self._ready: asyncio.Future | None = None
        self._harvest = False  # a fresh process: its compiled packers go to the worker's numba cache once ready
        self._lock = asyncio.Lock()
        self._one_job = asyncio.Lock()  # the pipe carries one job at a time (a warm-up, then a trial)

    @property
    def scratch(self) -> Path:
        return self.dirs.scratch

    @property
    def sandboxed(self) -> bool:
        return self.setup.layout is not None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.dirs.fresh()
        if self.setup.numba.is_dir():  # a copy: what this runner writes never reaches the worker's
            link_tree(self.setup.numba, self.dirs.scratch / "numba", copy=True)
        self.serving, self._harvest = None, True
        command = [sys.executable, "-m", "nsd.worker.runner", "--cpus", ",".join(map(str, self.cpus)),
                   "--workdir", str(self.dirs.scratch)]
        if self.sandboxed:
            command = bwrap_argv(self.setup.layout, str(self.dirs.scratch), str(self.dirs.files), command)
        # Pinned from its first instruction, sandbox included (the runner pins itself again, and its threads).
        command = ["taskset", "--cpu-list", ",".join(map(str, self.cpus)), *command]
        with open(self.log_path, "ab") as log_file:
            # A fresh interpreter (never a fork of a process that holds a zmq Context).
            self.proc = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log_file,
                start_new_session=True, env=self.env, cwd=self.dirs.scratch)
        self._ready = asyncio.ensure_future(pipe.read_async(self.proc.stdout, MAX_ANSWER_BYTES))

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
            if self._harvest:  # no job has run in it yet: what it compiled is ours
                self._harvest = False
                with contextlib.suppress(OSError, ValueError):
                    link_tree(self.dirs.scratch / "numba", self.setup.numba, copy=True)

    async def prepare(self, task_id: str) -> None:
        """Ready for a job of `task_id`; where another task's python recipe ran, in a fresh process."""
        async with self._one_job:
            await self._prepare(task_id)

    async def _prepare(self, task_id: str) -> None:
        if self.serving not in (None, task_id):
            await self.stop(kill=True)
        await self.ready()

    def update(self, message: dict) -> None:
        """An update for the job the runner runs (or is about to run: it keeps those until that job
        starts), written now between the job and its answer."""
        if self.alive and self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.write(pipe.encode(message))

    async def run(self, job: dict) -> dict:
        async with self._one_job:
            await self._prepare(job["task_id"])
            if job["spec"]["recipe"]["kind"] == "python":
                self.serving = job["task_id"]  # its code runs here from now on
            exclusive = False
            try:
                self.proc.stdin.write(pipe.encode(expose(job, self.setup.blobs, self.dirs)))
                await self.proc.stdin.drain()
                while True:
                    try:
                        answer = await pipe.read_async(self.proc.stdout, MAX_ANSWER_BYTES)
                    except ValueError as exc:  # out of step with us: it cannot be trusted with another job
                        await self.stop(kill=True)
                        raise RunnerDied(f"runner sent a malformed answer ({exc})") from None
                    if answer is None:
                        raise RunnerDied(await self._death())
                    if not (isinstance(answer, dict) and set(answer) == {"exclusive"}):
                        return answer
                    exclusive = answer["exclusive"] is True
                    paused = await self.on_exclusive(self, exclusive) if self.on_exclusive else 0
                    self.proc.stdin.write(pipe.encode({"paused": paused}))
                    await self.proc.stdin.drain()
            finally:
                if exclusive and self.on_exclusive:  # it died, or was cancelled, while the others were paused
                    await self.on_exclusive(self, False)
                with contextlib.suppress(OSError):
                    self.dirs.clear_files()

    async def _death(self) -> str:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 5)
        return describe_exit(self.proc.returncode, self.sandboxed)

    async def stop(self, kill: bool = False) -> None:
        """End the process (its whole sandbox) and wipe its folders."""
        if self.alive:
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
        if self.proc is not None:
            self.dirs.remove()


@dataclass
class Slot:
    """A runner pinned to a set of cores, and the job it runs (if any). Slots come and go with the
    shapes of the trials this worker is given: a 4-core trial gets a runner on 4 cores of one node."""
    runner: RunnerProcess
    job: tuple[str, int] | None = None  # (trial_id, attempt) it runs
    task: asyncio.Task | None = None
    last_task_id: str | None = None  # whose model its runner has cached
    last_used: float = 0.0

    @property
    def cpus(self) -> tuple[int, ...]:
        return tuple(self.runner.cpus)


class SlotPool:
    """This worker's slots, and the background work on their runners (starts, warm-ups, retirements)."""

    def __init__(self, cpus: list[int], cores_per_trial: int, cache_dir: Path, worker_id: str, setup: RunnerSetup):
        self.cpus, self.cache_dir, self.worker_id, self.setup = list(cpus), cache_dir, worker_id, setup
        self.homes = cache_dir / "runners" / worker_id  # one folder per runner (RunnerDirs)
        shutil.rmtree(self.homes, ignore_errors=True)  # a crashed worker's runners left theirs
        self.nodes = numa_nodes(self.cpus)
        self.default_k = max(1, min(cores_per_trial, len(self.cpus)))
        self._runner_ids = itertools.count()
        self.slots: list[Slot] = []
        self._background: set[asyncio.Task] = set()
        self._retired: list[RunnerProcess] = []  # runners whose cores went to trials of another shape
        self._measuring = asyncio.Lock()  # one runner's measurement at a time has the machine (_exclusive)
        self._paused: list[int] = []  # the processes it stopped
        self._measurer: RunnerProcess | None = None
        free = set(self.cpus)
        while (cores := allocate(free, self.nodes, self.default_k)) is not None:  # the default shape, warm
            self.slots.append(self._new_slot(cores))
            free -= set(cores)

    @property
    def capacity(self) -> int:
        """Trials of the default shape this worker can run at once (its advertised slots)."""
        return max(1, len(self.cpus) // self.default_k)

    @property
    def busy(self) -> int:
        return sum(s.job is not None for s in self.slots)

    def holding(self, trial_id: str, attempt: int) -> Slot | None:
        return next((s for s in self.slots if s.job == (trial_id, attempt)), None)

    def _new_slot(self, cores: tuple[int, ...]) -> Slot:
        i = next(self._runner_ids)
        return Slot(RunnerProcess(list(cores), self.homes / str(i),
                                  self.cache_dir / "logs" / f"{self.worker_id}-runner{i}.log", self.setup,
                                  self._exclusive))

    async def _exclusive(self, runner: RunnerProcess, on: bool) -> int:
        """A runner measuring (on) or done (off): the worker's other runners are stopped (SIGSTOP to each
        process of theirs: a sandboxed runner is in a session of its own, below bwrap) while it times its
        batches, so that no neighbour of this worker shares the machine with the figures. One measurement at a
        time: a second waits for the first to resume the others. Returns how many runners were paused."""
        if on:
            await self._measuring.acquire()
            self._measurer = runner
            others = [r for r in self._all_runners() if r is not runner and r.alive]
            self._paused = [pid for r in others for pid in process_tree(r.proc.pid)]
            for pid in self._paused:
                _signal(pid, signal.SIGSTOP)
            await _stopped(self._paused)  # delivered, not only sent, before it times
            return len(others)
        if self._measurer is runner:
            for pid in self._paused:
                _signal(pid, signal.SIGCONT)
            self._paused, self._measurer = [], None
            self._measuring.release()
        return 0

    def _all_runners(self) -> list[RunnerProcess]:
        return [s.runner for s in self.slots] + self._retired

    async def start(self) -> None:
        """Start every runner: their imports are paid before work arrives."""
        await asyncio.gather(*(s.runner.start() for s in self.slots))

    def slot_for(self, job: dict) -> Slot | None:
        """A runner on `job["cores"]` free cores: an idle one of that shape (one that has this task's model
        cached first, then one that need not be replaced first), else a new one on freshly allocated cores,
        retiring idle runners in its way."""
        k = max(1, min(int(job.get("cores") or self.default_k), len(self.cpus)))
        free = set(self.cpus) - {c for s in self.slots if s.job for c in s.cpus}
        idle = sorted((s for s in self.slots if s.job is None and len(s.cpus) == k),
                      key=lambda s: (s.last_task_id != job["task_id"],  # its model cached
                                     s.runner.serving not in (None, job["task_id"]),  # else: no restart needed
                                     -s.last_used))
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

    def occupy(self, slot: Slot, trial_id: str, attempt: int, task_id: str, work: Coroutine) -> None:
        slot.job, slot.last_task_id, slot.last_used = (trial_id, attempt), task_id, time.monotonic()
        slot.task = asyncio.create_task(work)

    def _retire(self, slot: Slot) -> None:
        self.slots.remove(slot)
        self._retired.append(slot.runner)
        self._spawn(slot.runner.stop())

    def in_background(self, work: Callable[[], Awaitable]) -> None:
        """Work of the worker's own (a prefetch) that no job waits for: quiet, cancelled at close."""
        self._spawn(_quietly(work))

    def _spawn(self, work: Coroutine) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def warm_others(self, planning: Slot, job: dict) -> None:
        """While one runner plans a task, the idle ones load its model too: its trials come next, and
        loading it then would hold every first trial up by the model's load time."""
        for slot in self.slots:
            if slot is planning or slot.job is not None or slot.last_task_id == job["task_id"]:
                continue
            slot.last_task_id = job["task_id"]
            self._spawn(_quietly(partial(slot.runner.run, {**job, "kind": "warm"})))

    def restart(self, slot: Slot) -> None:
        """Replace a runner that died (crash, timeout, cancel) now, not when the next job arrives."""
        if not slot.runner.alive and slot in self.slots:
            self._spawn(_quietly(slot.runner.ready))

    @staticmethod
    async def ends_within(task: asyncio.Task, seconds: float) -> bool:
        done, _ = await asyncio.wait({task}, timeout=seconds)  # the job itself is not cancelled by waiting
        return bool(done)

    async def kill_job(self, slot: Slot) -> None:
        """INC calls cannot be interrupted: end the slot's runner (the next job starts a fresh one). The
        process goes first: a job waiting for the slot may take it as soon as this one ends, and must not
        meet the old process dying. (The job's own answer is dropped by the caller: it was cancelled.)"""
        task = slot.task
        await slot.runner.stop(kill=True)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def close(self) -> None:
        """Stop everything: background work, jobs (their runners killed), idle and retired runners."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for slot in self.slots:
            if slot.task is not None:
                slot.task.cancel()
        await asyncio.gather(*(s.runner.stop(kill=s.job is not None) for s in self.slots),
                             *(r.stop(kill=True) for r in self._retired), return_exceptions=True)


def process_tree(root: int) -> list[int]:
    """`root` and every process below it (read from /proc: children may sit in other sessions and namespaces)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


async def _stopped(pids: list[int], timeout_s: float = 2.0) -> None:
    """Wait until these processes show as stopped (`T` in /proc/PID/stat), or gone, or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _state(pid) not in ("T", "t", "Z", None)]
        if pids:
            await asyncio.sleep(0.005)


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


async def _quietly(work: Callable[[], Awaitable]) -> None:
    """Background runner work (a warm-up, a restart): a failure shows again when a job needs the runner.
    Called here, not by the caller: a task cancelled before it starts must leave no coroutine unawaited."""
    with contextlib.suppress(Exception):
        await work()
