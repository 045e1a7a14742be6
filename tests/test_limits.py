"""The daemons raise their soft open-files limit to the hard limit at start: ~1,100 idle connections
exhausted the common soft default of 1,024 descriptors."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import free_port

NSD = [sys.executable, "-m", "nsd"]


def soft_open_files(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max open files"))
    return int(line.split()[3])


@pytest.mark.parametrize("daemon", ["broker", "worker"])
def test_a_daemon_raises_its_soft_open_files_limit_to_the_hard_limit(tmp_path, daemon):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 512:
        pytest.skip(f"needs a finite hard limit of at least 512 open files (have {hard})")

    def lower_soft_limit():  # what a login shell or a plain service manager gives
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    port = free_port()
    args = (["broker", "--state-dir", str(tmp_path / "state"), "--clients", f"tcp://127.0.0.1:{free_port()}",
             "--workers", f"tcp://127.0.0.1:{port}", "--events", f"tcp://127.0.0.1:{free_port()}"]
            if daemon == "broker" else
            ["worker", "--broker", f"tcp://127.0.0.1:{port}", "--cores", "1", "--cache-dir", str(tmp_path / "w")])
    proc = subprocess.Popen([*NSD, *args], preexec_fn=lower_soft_limit, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "LOGLEVEL": "WARNING"})
    try:
        deadline = time.monotonic() + 60
        while soft_open_files(proc.pid) != hard and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert soft_open_files(proc.pid) == hard
    finally:
        runners = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        for pid in [proc.pid, *map(int, runners)]:  # a worker's runners run in sessions of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(10)
