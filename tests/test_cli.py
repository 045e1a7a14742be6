"""The `nsd` command line as a user runs it: real daemons in real processes, stopped by PID (those tests
are marked slow: they start runners), and the cheap checks of its options and errors (not slow)."""

from __future__ import annotations

import json
import os
import signal

import subprocess
import sys
import time

import pytest

from tests.conftest import DIGITS, ROOT, free_port, kill_pid

NSD = [sys.executable, "-m", "nsd"]


def nsd(*args: str, env: dict, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run([*NSD, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"nsd {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def cluster(tmp_path):
    ports = [free_port() for _ in range(3)]
    addr = [f"tcp://127.0.0.1:{p}" for p in ports]
    env = {**os.environ, "NSD_BROKER": addr[0], "LOGLEVEL": "WARNING"}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []

    def start(name: str, *args: str) -> subprocess.Popen:
        with open(logs / f"{name}.log", "w") as log:  # the child keeps its own copy of the descriptor
            procs.append(subprocess.Popen([*NSD, name, *args], env=env, stdout=log, stderr=subprocess.STDOUT))
        return procs[-1]

    broker = start("broker", "--state-dir", str(tmp_path / "state"), "--clients", addr[0], "--workers", addr[1],
                   "--events", addr[2], "--heartbeat", "0.5")
    worker = start("worker", "--broker", addr[1], "--cores", "1", "--cache-dir", str(tmp_path / "cache"),
                   "--heartbeat", "0.5", "--label", "cli-test")
    try:
        deadline = time.time() + 60
        while json.loads(nsd("cluster", "--json", env=env).stdout)["workers"] == []:
            assert time.time() < deadline, (logs / "worker.log").read_text()
            time.sleep(0.3)
        yield env, broker, worker, logs
    finally:
        for p in procs:
            if p.poll() is None:
                kill_pid(p.pid, signal.SIGKILL)
                p.wait(10)


@pytest.mark.slow
def test_submit_watch_status_result_list_cluster_and_clean_stop(cluster):
    env, broker, worker, logs = cluster
    task_id = nsd("submit", str(DIGITS / "task.toml"), env=env).stdout.strip()
    assert len(task_id) == 12
    watched = nsd("watch", task_id, env=env)
    assert "done" in watched.stdout and "winner    trial 2" in watched.stdout
    status = json.loads(nsd("status", task_id, "--json", env=env).stdout)
    assert status["state"] == "done" and status["winner"]["index"] == 2
    result = json.loads(nsd("result", task_id, "--json", env=env).stdout)
    assert result["met_goal"] is True and result["baseline"] > 0.9
    assert {"index", "config", "state", "metric", "attempt", "worker", "seconds"} <= set(result["trials"][0])
    listed = json.loads(nsd("list", "--json", env=env).stdout)["tasks"]
    assert [t["task_id"] for t in listed] == [task_id]
    workers = json.loads(nsd("cluster", "--json", env=env).stdout)["workers"]
    assert workers[0]["cores"] == 1 and workers[0]["slots"] == 1 and workers[0]["busy"] == 0
    assert workers[0]["hardware"]["cores"] == 1 and workers[0]["hardware"]["label"] == "cli-test"
    assert "label cli-test: " in nsd("cluster", env=env).stdout  # the kind of machine its figures belong to
    text = nsd("result", task_id[:6], env=env).stdout  # a unique prefix is enough
    assert "passed" in text and "failed_goal" in text
    # A clean stop on SIGTERM: exit 0, and the worker's runner goes with it.
    runner_pids = subprocess.run(["pgrep", "-f", "nsd.worker.runner", "-P", str(worker.pid)], capture_output=True,
                                 text=True).stdout.split()
    assert runner_pids  # the worker runs its slot's runner as a child
    for p in (worker, broker):
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
    for pid in runner_pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


@pytest.mark.slow
def test_submit_wait_json_and_errors_a_person_can_read(cluster, tmp_path):
    env, *_ = cluster
    out = nsd("submit", str(DIGITS / "task.toml"), "--wait", "--json", env=env)
    assert json.loads(out.stdout)["winner"]["index"] == 2
    bad = tmp_path / "bad.toml"
    bad.write_text('[recipe]\nfile = "missing.py"\n[tuning]\nconfig_set = [{rnt = {}}]\ntolerable_loss = -1\n')
    proc = nsd("submit", str(bad), env=env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "unknown INC config 'rnt'" in proc.stderr and "tuning.tolerable_loss" in proc.stderr
    proc = nsd("status", "doesnotexist", env=env, check=False)
    assert proc.returncode == 1 and "no task 'doesnotexist'" in proc.stderr
    dead = {**env, "NSD_BROKER": f"tcp://127.0.0.1:{free_port()}"}
    proc = subprocess.run([*NSD, "list"], env=dead, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no answer from the nsd broker" in proc.stderr


@pytest.mark.slow
def test_nsd_run_leaves_no_process_behind(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([*NSD, "run", str(DIGITS / "task.toml"), "--workers", "2", "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["state"] == "done" and result["winner"]["index"] == 2
    assert {t["worker"] for t in result["trials"] if t["worker"]} <= {"local-0", "local-1"}
    left = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert left == []  # nothing left in its session
    left = subprocess.run(["pgrep", "-f", f"nsd.worker.runner.*{tmp_path}"], capture_output=True,
                          text=True).stdout.split()
    assert left == []  # and no runner (they run in sessions of their own)
    assert not list(tmp_path.glob("nsd-run-*"))  # its private folder is removed


def test_the_shipped_example_configs_are_accepted(tmp_path):
    """systemd/*.toml use the options' long names (`broker`, `id`): each daemon accepts its file."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for daemon, config in (("broker", "broker"), ("worker", "worker"), ("broker", "broker-pair-primary"),
                           ("broker", "broker-pair-backup")):
        proc = subprocess.run([*NSD, daemon, "--config", str(ROOT / "systemd" / f"{config}.toml"), "--help"],
                              env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    (tmp_path / "w.toml").write_text('broker = "tcp://127.0.0.1:1"\nid = "node-7"\n')
    proc = subprocess.run([*NSD, "worker", "--config", str(tmp_path / "w.toml"), "--help"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "bad.toml").write_text('brokr = "x"\n')
    proc = subprocess.run([*NSD, "worker", "--config", str(tmp_path / "bad.toml"), "--help"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "unknown setting 'brokr'" in proc.stderr


def test_a_json_spec_that_is_not_an_object_is_one_clear_line(tmp_path):
    spec = tmp_path / "task.json"
    spec.write_text("[1, 2]")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*NSD, "submit", str(spec)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "a task spec is a table (a JSON object), not list" in proc.stderr


@pytest.mark.parametrize("daemon", ["broker", "worker", "gateway"])
def test_each_daemon_option_defaults_to_its_config_field(daemon):
    """One source for every default: `nsd broker` / `nsd worker` / `nsd gateway` options take theirs from
    BrokerConfig / WorkerConfig / GatewayConfig (and BrokerLimits), endpoints from one table."""
    from dataclasses import fields

    from nsd.broker.config import BrokerConfig
    from nsd.broker.limits import BrokerLimits
    from nsd.cli import main
    from nsd.client.api import DEFAULT_BROKER
    from nsd.gateway.config import GatewayConfig
    from nsd.protocol import DEFAULT_ENDPOINTS
    from nsd.worker.config import WorkerConfig

    command = main.commands[daemon]
    defaults = {p.name: p.default for p in command.params}
    if daemon == "broker":
        config, limits = BrokerConfig(), BrokerLimits()
        expected = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in ("state_dir", "limits")}
        expected.update({f.name: getattr(limits, f.name) for f in fields(limits)})
        assert config.clients == DEFAULT_BROKER  # a client looks where a broker binds by default
    elif daemon == "gateway":
        config = GatewayConfig()
        expected = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in ("limits", "keepalive_s")}
        expected.update(broker=config.broker or DEFAULT_BROKER, max_upload=config.limits.max_upload / 1024**3)
    else:
        config = WorkerConfig()
        assert config.broker == DEFAULT_ENDPOINTS["workers"] == BrokerConfig().workers
        expected = {"broker_addr": config.broker, "cores_per_trial": config.cores_per_trial, "worker_id": config.worker_id,
                    "heartbeat": config.heartbeat_s, "grace": config.grace_s, "preload": config.preload,
                    "cache_size": config.cache_max_bytes / 1024**3, "shared_dirs": config.shared_dirs,
                    "runner_env": config.runner_env, "no_sandbox": not config.sandbox}
    assert {name: defaults[name] for name in expected} == expected


@pytest.mark.parametrize("args, problem", [(["--heartbeat", "0.01"], "'--heartbeat': 0.01 is not in the range"),
                                           (["--heartbeat", "61"], "'--heartbeat': 61.0 is not in the range"),
                                           (["--liveness", "0"], "'--liveness': 0 is not in the range")])
def test_the_broker_refuses_a_heartbeat_its_workers_would_refuse(tmp_path, args, problem):
    """One range for both sides (nsd/liveness.py): a broker at 0.01 s would have every worker ignore its
    READY_ACK and be declared dead."""
    from click.testing import CliRunner

    from nsd.broker.config import BrokerConfig
    from nsd.broker.daemon import Broker
    from nsd.cli import main

    result = CliRunner().invoke(main, ["broker", "--state-dir", str(tmp_path), *args])
    assert result.exit_code == 2 and problem in result.output, result.output
    with pytest.raises(ValueError, match="heartbeat_s '0.01' is not between 0.05 and 60.0"):
        Broker(BrokerConfig(state_dir=tmp_path, heartbeat_s=0.01))
