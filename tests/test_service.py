"""Running as a service: systemd units, the notify protocol, config files, metrics, CPU pinning."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from nsd.cli import main
from tests.conftest import ROOT, TEST_RUNNER_ENV, free_port, kill_pid, wait_for
from tests.peers import NotifyListener, ScriptedWorker, done, metrics_answer, spec

UNITS = ROOT / "systemd"
NSD = [sys.executable, "-m", "nsd"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_units_pass_systemd_analyze_verify(tmp_path):
    units = []
    for name in ("nsd-broker.service", "nsd-worker.service"):
        text = (UNITS / name).read_text()
        assert "Type=notify" in text and "WatchdogSec=" in text and "Restart=on-failure" in text
        assert "NoNewPrivileges=yes" in text and "ProtectSystem=strict" in text and "User=nsd" in text
        assert "\nLimitNOFILE=65536\n" in text  # the daemon raises its soft limit to this (nsd.limits)
        # verify checks that ExecStart exists: point it at this checkout's nsd.
        (tmp_path / name).write_text(text.replace("/opt/nsd/bin/nsd", shutil.which("nsd") or sys.executable))
        units.append(str(tmp_path / name))
    proc = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    (tmp_path / "typo.service").write_text((tmp_path / units[0]).read_text().replace("WatchdogSec", "WatchdogSek"))
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "typo.service")], capture_output=True,
                          text=True, timeout=60)
    assert "Unknown key" in proc.stderr  # the check above can fail


@pytest.mark.slow
@pytest.mark.parametrize("daemon", ["broker", "worker"])
def test_daemons_speak_the_notify_protocol(tmp_path, daemon):
    listener = NotifyListener(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "600000"}
    args = (["broker", "--state-dir", str(tmp_path / "state"), "--clients", f"tcp://127.0.0.1:{free_port()}",
             "--workers", f"tcp://127.0.0.1:{free_port()}", "--events", f"tcp://127.0.0.1:{free_port()}"]
            if daemon == "broker" else
            ["worker", "--broker", f"tcp://127.0.0.1:{free_port()}", "--cores", "1", "--cache-dir", str(tmp_path)])
    proc = subprocess.Popen([*NSD, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ready = listener.read_until("READY", 60)
        assert ready["READY"] == "1" and "STATUS" in ready
        ping = listener.read_until("WATCHDOG", 10)
        assert ping["WATCHDOG"] == "1" and ping["STATUS"]
        listener.read_until("WATCHDOG", 10)  # and again: it keeps pinging from its loop
        proc.send_signal(signal.SIGTERM)
        listener.read_until("STOPPING", 30)
        assert proc.wait(30) == 0
        keys = [k for m in listener.messages for k in m if k != "STATUS"]
        assert keys[0] == "READY" and keys[-1] == "STOPPING"
    finally:
        if proc.poll() is None:
            kill_pid(proc.pid)
            proc.wait(10)
        proc.stderr.close()
        listener.close()


def test_config_file_settings_and_their_errors(tmp_path):
    bad = tmp_path / "broker.toml"
    bad.write_text('heartbeat = 1.0\nhartbeat = 2\n')
    result = CliRunner().invoke(main, ["broker", "--config", str(bad)])
    assert result.exit_code == 2 and "unknown setting 'hartbeat'" in result.output
    bad.write_text("heartbeat = [")
    result = CliRunner().invoke(main, ["broker", "--config", str(bad)])
    assert result.exit_code == 2 and "not valid TOML" in result.output


@pytest.mark.slow
def test_config_file_is_used_and_flags_override_it(tmp_path):
    port, flag_port = free_port(), free_port()
    conf = tmp_path / "broker.toml"
    conf.write_text(f'clients = "tcp://127.0.0.1:{port}"\nworkers = "tcp://127.0.0.1:{free_port()}"\n'
                    f'events = "tcp://127.0.0.1:{free_port()}"\nstate_dir = "{tmp_path / "state"}"\n')
    for expected, extra in ((port, []), (flag_port, ["--clients", f"tcp://127.0.0.1:{flag_port}"])):
        proc = subprocess.Popen([*NSD, "broker", "--config", str(conf), *extra], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            env = {**os.environ, "NSD_BROKER": f"tcp://127.0.0.1:{expected}"}
            deadline = time.time() + 30
            while subprocess.run([*NSD, "list"], env=env, capture_output=True).returncode != 0:
                assert time.time() < deadline, "broker not reachable where the config says"
            assert (tmp_path / "state" / "nsd.sqlite3").exists()
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0


async def test_prometheus_metrics(tmp_path):
    from nsd.broker.config import BrokerConfig
    from nsd.broker.daemon import Broker
    from nsd.client.api import AsyncClient

    broker = Broker(BrokerConfig(state_dir=tmp_path / "state", clients="tcp://127.0.0.1:*", workers="tcp://127.0.0.1:*",
                    events="tcp://127.0.0.1:*", metrics="127.0.0.1:0"))
    await broker.start()
    client = AsyncClient(broker.endpoints["clients"])
    w = await ScriptedWorker(broker.endpoints["workers"], "s1", slots=2,
                             answer=metrics_answer({0: 0.5, 1: 0.95, 2: 0.2, 3: 0.99, 4: 0.99, 5: 0.99})).start()
    try:
        await done(client, await client.submit(spec()))
        host, port = broker.endpoints["metrics"].split("//")[1].split("/")[0].split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        page = (await reader.read()).decode()
        writer.close()
        await writer.wait_closed()
        head, body = page.split("\r\n\r\n", 1)
        assert head.split(" ", 2)[1] == "200" and "text/plain; version=0.0.4" in head
        values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
                  if line and not line.startswith("#")}
        assert values['nsd_tasks{state="done"}'] == 1 and values["nsd_workers_alive"] == 1
        assert values['nsd_trials_finished_total{state="failed_goal"}'] >= 1
        assert values["nsd_jobs_dispatched_total"] >= 4  # plan, trials, save
        assert values["nsd_slots"] == 2 and values["nsd_slots_busy"] == 0 and values["nsd_queue_depth"] == 0
        assert values['nsd_dispatch_latency_seconds_bucket{le="+Inf"}'] == values["nsd_dispatch_latency_seconds_count"]
        assert values["nsd_bad_messages_total"] == 0 and values["nsd_trials_requeued_total"] == 0
        assert values["process_resident_memory_bytes"] > 0  # prometheus_client's process metrics
    finally:
        await w.stop()
        await client.close()
        await broker.stop()


@pytest.mark.slow
async def test_runners_are_pinned_to_their_slots_cores(tmp_path, broker):
    from nsd.worker.daemon import WorkerConfig, WorkerDaemon

    cpus = sorted(os.sched_getaffinity(0))
    daemon = WorkerDaemon(WorkerConfig(broker=broker.endpoints["workers"], cpus=cpus, cores_per_trial=1,
                                       cache_dir=tmp_path / "w", worker_id="pin", heartbeat_s=0.5))
    task = asyncio.create_task(daemon.run())
    try:
        await asyncio.wait_for(daemon.registered.wait(), 60)
        await asyncio.gather(*(s.runner.ready() for s in daemon.slots))
        assert len(daemon.slots) == len(cpus)
        for slot, cpu in zip(daemon.slots, cpus):
            assert os.sched_getaffinity(slot.runner.proc.pid) == {cpu}
        await wait_for(lambda: broker.workers.get("pin"), 10)
        assert broker.workers["pin"].slots == len(cpus) and broker.workers["pin"].cores == len(cpus)
    finally:
        daemon.stop(grace_s=0)
        await task


@pytest.mark.slow
async def test_each_task_runs_trials_on_its_own_number_of_cores(client, broker, tmp_path):
    from nsd.worker.daemon import WorkerConfig, WorkerDaemon
    from tests.conftest import RECIPES, digits_spec

    cpus = sorted(os.sched_getaffinity(0))[:2]
    if len(cpus) < 2:
        pytest.skip("needs 2 cores")
    daemon = WorkerDaemon(WorkerConfig(broker=broker.endpoints["workers"], cpus=cpus, cores_per_trial=1,
                                       cache_dir=tmp_path / "w", worker_id="shapes", heartbeat_s=0.5,
                                       shared_dirs=[ROOT], runner_env=list(TEST_RUNNER_ENV)))
    task = asyncio.create_task(daemon.run())
    try:
        await asyncio.wait_for(daemon.registered.wait(), 60)
        for k in (2, 1):
            spec = digits_spec(max_trials=3)
            spec["recipe"]["file"] = str(RECIPES / "slow.py")
            spec["model"]["shared"] = True
            spec["resources"] = {"cores_per_trial": k}
            result = await client.result(await client.submit(spec), wait=True)
            assert result["state"] == "done", result["error"]
            for entry in await client.logs(result["task_id"]):
                if entry["job"] not in ("plan", "save"):
                    used = [line for line in entry["text"].splitlines() if line.startswith("cores ")]
                    assert used, entry["text"]
                    cores = json.loads(used[-1].split(" threads ")[0][len("cores "):])
                    threads = int(used[-1].split(" threads ")[1])
                    assert len(cores) == k and set(cores) <= set(cpus) and threads == k
        assert sorted(len(s.cpus) for s in daemon.slots) == [1, 1]  # back to the worker's own shape
    finally:
        daemon.stop(grace_s=0)
        await task
