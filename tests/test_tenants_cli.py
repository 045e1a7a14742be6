"""Two tenants drive the `nsd` command line against a real CURVE broker process (issue 16 "Done means"):
B's every command on A's task reads as on a task that does not exist; an admin sees both and the audit
log; `nsd delete` erases. The commands run in this process (click's runner); the broker is its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from nsd.cli import main
from nsd.security import allow, generate_keypair
from tests.conftest import ROOT, free_port, kill_pid
from tests.peers import SPEC


@pytest.fixture
def curve_broker(tmp_path):
    """A real `nsd broker` process with CURVE: (endpoint, {name: secret key file}, broker's public key)."""
    made = {name: generate_keypair(tmp_path / "made", name) for name in ("broker", "alice", "bob", "root")}
    keys = tmp_path / "keys"
    allow(keys, "client", made["alice"][0], code=True)
    allow(keys, "client", made["bob"][0], code=True)
    allow(keys, "admin", made["root"][0])
    ports = [free_port() for _ in range(3)]
    endpoint = f"tcp://127.0.0.1:{ports[0]}"
    log = open(tmp_path / "broker.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "nsd", "broker", "--state-dir", str(tmp_path / "state"),
                             "--clients", endpoint, "--workers", f"tcp://127.0.0.1:{ports[1]}",
                             "--events", f"tcp://127.0.0.1:{ports[2]}", "--curve-secret", str(made["broker"][1]),
                             "--keys-dir", str(keys)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        yield endpoint, {name: secret for name, (_, secret) in made.items()}, made["broker"][0]
    finally:
        kill_pid(proc.pid, signal.SIGKILL)
        proc.wait(10)
        log.close()


def test_two_tenants_on_the_command_line(curve_broker, tmp_path):
    endpoint, secret, server = curve_broker
    runner = CliRunner()

    def nsd(who: str, *args: str):
        env = {"NSD_BROKER": endpoint, "NSD_CURVE_KEY": str(secret[who]), "NSD_SERVER_KEY": str(server)}
        return runner.invoke(main, list(args), env=env)

    spec_file = tmp_path / "task.json"
    spec_file.write_text(json.dumps(SPEC))
    deadline = time.time() + 30
    while (submitted := nsd("alice", "submit", str(spec_file))).exit_code != 0:
        assert time.time() < deadline, submitted.output  # the broker process is still starting
        time.sleep(0.3)
    task_id = submitted.output.strip()
    assert len(task_id) == 12

    assert task_id not in nsd("bob", "list").output
    for args in (["status", task_id], ["result", task_id], ["logs", task_id], ["cancel", task_id],
                 ["delete", task_id], ["fetch", task_id, "-o", str(tmp_path / "loot")], ["watch", task_id],
                 ["cache", "purge", "--task", task_id], ["status", task_id[:6]]):
        asked = next(a for a in args if a.startswith(task_id[:6]))
        mine, unknown = nsd("bob", *args), nsd("bob", *[a.replace(task_id[:6], "ffffff") for a in args])
        assert mine.exit_code == 1 and f"no task '{asked}'" in mine.output, args
        assert mine.output.replace(task_id[:6], "ffffff") == unknown.output, args  # the same answer
    assert not (tmp_path / "loot" / "model").exists()
    refused = nsd("bob", "audit")
    assert refused.exit_code == 1 and "admin keys" in refused.output

    admin = nsd("root", "list")
    assert admin.exit_code == 0 and task_id in admin.output and "alice" in admin.output
    entries = json.loads(nsd("root", "audit", "--json").output)["entries"]
    assert {(e["action"], e["actor"], e["task_id"]) for e in entries} >= {("submit", "client:alice", task_id)}
    assert any(e["action"] == "refused" and e["actor"] == "client:bob" for e in entries)

    deleted = nsd("alice", "delete", task_id)
    assert deleted.exit_code == 0 and f"deleted {task_id}" in deleted.output
    assert f"no task '{task_id}'" in nsd("alice", "status", task_id).output
    assert ("delete", "client:alice", task_id) in {(e["action"], e["actor"], e["task_id"]) for e in
                                                   json.loads(nsd("root", "audit", "--json").output)["entries"]}
