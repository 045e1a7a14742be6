"""Nothing lost: real daemons in real processes, killed with real signals, and the task still ends with
the answer an undisturbed run gives."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nsd.client.api import AsyncClient
from nsd.client.view import apply_event
from tests.conftest import (RECIPES, ROOT, TEST_RUNNER_ENV, UNDISTURBED_WINNER, digits_spec, free_port, kill_pid,
                            slow_spec, wait_for)


pytestmark = pytest.mark.slow
NSD = [sys.executable, "-m", "nsd"]
class Processes:
    """Daemons started as `nsd` subprocesses; everything they (and their runners) leave is killed by PID."""

    def __init__(self, tmp: Path, env: dict):
        self.tmp, self.env, self.procs = tmp, env, {}
        self.ports = {name: free_port() for name in ("clients", "workers", "events")}

    def addr(self, name: str) -> str:
        return f"tcp://127.0.0.1:{self.ports[name]}"

    def start(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.tmp / f"{name}.log", "a") as log:
            proc = subprocess.Popen([*NSD, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def broker(self) -> subprocess.Popen:
        return self.start("broker", "broker", "--state-dir", str(self.tmp / "state"), "--clients",
                          self.addr("clients"), "--workers", self.addr("workers"), "--events", self.addr("events"),
                          "--heartbeat", "0.5", "--liveness", "6")

    def worker(self, name: str, *extra: str) -> subprocess.Popen:
        return self.start(name, "worker", "--broker", self.addr("workers"), "--cores", "1", "--id", name,
                          "--cache-dir", str(self.tmp / name), "--heartbeat", "0.5", "--shared-dir", str(ROOT),
                          *(f"--runner-env={v}" for v in TEST_RUNNER_ENV), *extra)

    def runners_of(self, name: str) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.procs[name].pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop_all(self) -> None:
        pids = [pid for name in self.procs for pid in self.runners_of(name)] + [p.pid for p in self.procs.values()]
        pids += self.orphans
        for pid in pids:
            kill_pid(pid, signal.SIGKILL)
        for proc in self.procs.values():
            proc.wait(10)

    orphans: list[int] = []


@pytest.fixture
def daemons(tmp_path):
    env = {**os.environ, "NSD_TEST_SLOW_S": "1.5", "LOGLEVEL": "WARNING"}
    procs = Processes(tmp_path, env)
    procs.orphans = []
    yield procs
    procs.stop_all()


async def connect(procs: Processes) -> AsyncClient:
    client = AsyncClient(procs.addr("clients"), timeout_s=5, idle_resnapshot_s=0.5)

    async def workers_up():
        try:
            return len(await client.cluster()) == sum(n.startswith("w") for n in procs.procs)
        except Exception:
            return False

    await wait_for(workers_up, 90, 0.3)
    return client


def trial_finishes(events: list[dict]) -> dict[int, int]:
    """How many times each trial was reported finished (cancelled excluded) in the event stream."""
    counts: dict[int, int] = {}
    for e in events:
        if e["kind"] == "trial" and e["state"] in ("passed", "failed_goal", "error"):
            counts[e["index"]] = counts.get(e["index"], 0) + 1
    return counts


async def test_sigkill_a_worker_mid_trial_the_trial_completes_elsewhere(daemons):
    daemons.broker()
    daemons.worker("wa")
    daemons.worker("wb")
    client = await connect(daemons)
    try:
        task_id = await client.submit(slow_spec(1.5))
        events: list[dict] = []

        async def follow():
            async for e in client.events(task_id):
                events.append(e)

        follower = asyncio.create_task(follow())

        async def wa_runs_a_trial():  # leased to wa, and wa has started it (its log exists): not in flight
            task = await client.status(task_id)
            logs = daemons.tmp / "wa" / "logs" / task_id
            return [t for t in task["trials"] if t["state"] == "running" and t["worker"] == "wa"
                    and (logs / f"{t['index']}-a{t['attempt']}.log").exists()]

        (victim,) = (await wait_for(wa_runs_a_trial, 90, 0.1))[:1]
        daemons.orphans += daemons.runners_of("wa")
        daemons.procs["wa"].send_signal(signal.SIGKILL)
        await asyncio.wait_for(follower, 120)
        result = await client.result(task_id)
        assert result["state"] == "done"
        assert (result["winner"]["index"], result["winner"]["metric"]) == UNDISTURBED_WINNER
        moved = result["trials"][victim["index"]]
        if moved["state"] == "cancelled":  # moot: only a trial above the winner is cancelled, wherever it was
            assert victim["index"] > result["winner"]["index"]
        else:  # run again, on the other worker, as its second attempt
            assert (moved["state"], moved["attempt"], moved["worker"]) in {("passed", 2, "wb"), ("failed_goal", 2, "wb")}
        assert all(n == 1 for n in trial_finishes(events).values())  # no trial counted twice
    finally:
        await client.close()


async def test_sigkill_the_broker_mid_task_and_restart_it(daemons):
    daemons.broker()
    daemons.worker("wa")
    client = await connect(daemons)
    try:
        task_id = await client.submit(slow_spec(1.5))
        view, seqs = None, []

        async def follow():
            nonlocal view
            async for e in client.events(task_id):  # rides out the restart by itself
                view = apply_event(view, e)
                seqs.append(e["seq"])

        follower = asyncio.create_task(follow())

        async def two_finished():
            task = await client.status(task_id)
            return [t for t in task["trials"] if t["state"] in ("failed_goal", "passed")][:2] \
                if sum(t["state"] in ("failed_goal", "passed") for t in task["trials"]) >= 2 else None

        finished_before = await wait_for(two_finished, 120, 0.1)
        daemons.procs["broker"].send_signal(signal.SIGKILL)
        daemons.procs["broker"].wait(10)
        await asyncio.sleep(1.0)  # an outage, not a wait for something: workers notice and back off meanwhile
        daemons.broker()
        await asyncio.wait_for(follower, 180)
        result = await client.result(task_id)
        assert result["state"] == "done"
        assert (result["winner"]["index"], result["winner"]["metric"]) == UNDISTURBED_WINNER
        for before in finished_before:  # kept exactly as they were: not redone
            after = result["trials"][before["index"]]
            assert (after["metric"], after["attempt"], after["state"]) == \
                (before["metric"], before["attempt"], before["state"])
        logs = sorted(p.name for p in (daemons.tmp / "wa" / "logs" / result["task_id"]).iterdir())
        for before in finished_before:
            assert [n for n in logs if n.startswith(f"{before['index']}-")] == [f"{before['index']}-a1.log"]
        assert seqs == sorted(set(seqs))  # the stream resumed without repeating or reordering
        assert view["state"] == "done" and view["winner"] == result["winner"]
    finally:
        await client.close()


async def test_sigterm_a_busy_worker_finishes_its_trial_and_loses_nothing(daemons):
    daemons.broker()
    daemons.worker("wa", "--grace", "60")
    daemons.worker("wb")
    client = await connect(daemons)
    try:
        task_id = await client.submit(slow_spec(1.5))

        async def wa_runs_a_trial():  # leased to wa, and wa has started it (its log exists): not in flight
            task = await client.status(task_id)
            logs = daemons.tmp / "wa" / "logs" / task_id
            return [t for t in task["trials"] if t["state"] == "running" and t["worker"] == "wa"
                    and (logs / f"{t['index']}-a{t['attempt']}.log").exists()]

        (victim,) = (await wait_for(wa_runs_a_trial, 90, 0.1))[:1]
        daemons.procs["wa"].send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemons.procs["wa"].wait, 60) == 0
        result = await client.result(task_id, wait=True)
        assert result["state"] == "done"
        assert (result["winner"]["index"], result["winner"]["metric"]) == UNDISTURBED_WINNER
        finished = result["trials"][victim["index"]]
        assert finished["worker"] == "wa" and finished["attempt"] == 1  # not handed back, not redone elsewhere
        if victim["index"] <= result["winner"]["index"]:  # the answer needed it: wa finished it within its grace
            assert finished["state"] == ("passed" if victim["index"] == result["winner"]["index"] else "failed_goal")
        else:  # above the winner: finished on wa, or cancelled there once the winner was known
            assert finished["state"] in ("failed_goal", "passed", "cancelled")
        assert all(t["worker"] == "wb" for t in result["trials"] if t["index"] > victim["index"] + 1
                   and t["state"] in ("failed_goal", "passed"))
    finally:
        await client.close()


async def test_a_hanging_trial_times_out_with_its_log_and_the_worker_goes_on(client, start_workers, monkeypatch):
    monkeypatch.setenv("NSD_TEST_HANG", "1")
    monkeypatch.setenv("NSD_TEST_SLOW_S", "0")
    spec = slow_spec(0)
    spec["tuning"]["trial_timeout_s"] = 6
    (worker,) = await start_workers(1)
    result = await client.result(await client.submit(spec), wait=True)
    assert result["state"] == "done" and result["winner"]["index"] == 2, [(t["state"], t["error"]) for t in result["trials"]]
    hung = result["trials"][0]
    assert hung["state"] == "error" and "exceeded trial_timeout_s=6s" in hung["error"]
    assert "about to hang" in hung["error"]  # the last lines of its log come with the reason
    logs = await client.logs(result["task_id"], 0)
    assert "about to hang" in logs[0]["text"] and logs[0]["worker"] == worker.worker_id
    assert (await client.cluster())[0]["worker_id"] == worker.worker_id


async def test_a_recipe_that_crashes_its_runner_is_an_error_and_the_worker_goes_on(client, start_workers):
    """The trial's own code takes its runner down (SIGSEGV); the next test kills one from outside."""
    spec = digits_spec()
    spec["recipe"]["file"] = str(RECIPES / "crashy.py")
    spec["model"]["shared"] = True
    (worker,) = await start_workers(1)
    first_pid = worker.slots[0].runner.proc.pid
    result = await client.result(await client.submit(spec), wait=True)
    assert result["state"] == "done" and result["winner"]["index"] == 2
    assert [t["state"] for t in result["trials"][:2]] == ["error", "error"]
    assert "SIGSEGV" in result["trials"][0]["error"]
    assert worker.slots[0].runner.proc.pid != first_pid  # replaced by a fresh runner
    assert (await client.cluster())[0]["worker_id"] == worker.worker_id


async def test_a_runner_killed_mid_trial_is_an_error_with_the_reason(client, start_workers, monkeypatch):
    """A runner killed from outside while it evaluates (the OOM killer's SIGKILL)."""
    monkeypatch.setenv("NSD_TEST_SLOW_S", "30")  # long enough to be caught running
    spec = slow_spec(30)
    spec["tuning"]["max_trials"] = 1
    (worker,) = await start_workers(1)
    task_id = await client.submit(spec)

    async def running():
        task = await client.status(task_id)
        return task["trials"] and task["trials"][0]["state"] == "running" and worker.slots[0].job

    await wait_for(running, 60)

    async def evaluating():  # inside evaluate() (it prints its cores first), not merely assigned
        log = worker.cache_dir / "logs" / task_id / "0-a1.log"
        return log.exists() and "cores [" in log.read_text()

    await wait_for(evaluating, 60)
    victim = next(s for s in worker.slots if s.job).runner.proc.pid
    kill_pid(victim, signal.SIGKILL)  # what the kernel's OOM killer does
    result = await client.result(task_id, wait=True)
    trial = result["trials"][0]
    assert trial["state"] == "error" and "runner killed by SIGKILL (out of memory?)" in trial["error"]
    assert "--- last lines of its log ---" in trial["error"] and "cores [" in trial["error"]
    assert result["state"] == "failed" and (await client.cluster())[0]["worker_id"] == worker.worker_id
