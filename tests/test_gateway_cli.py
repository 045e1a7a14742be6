"""`nsd gateway` as a daemon: its bind rules, config file, notify protocol, SIGHUP and SIGTERM."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from nsd.cli import main
from tests.conftest import ROOT, free_port, kill_pid

from tests.peers import NotifyListener

pytest.importorskip("fastapi")
NSD = [sys.executable, "-m", "nsd"]


@pytest.mark.parametrize("args, why", [
    ([], "refusing to start without --tokens"),  # the default: no token file, no start
    (["--http", "0.0.0.0:0"], "refusing to start without --tokens"),
    (["--no-auth", "--http", "0.0.0.0:0", "--insecure"], "with --no-auth: it is for development on loopback"),
    (["--no-auth", "--grpc", "192.0.2.1:0", "--http", ""], "with --no-auth"),
    (["--no-auth", "--tokens", "{tokens}"], "contradict"),
    (["--grpc", "0.0.0.0:0", "--tokens", "{tokens}"], "without --tls-cert/--tls-key; pass --insecure"),
])
def test_gateway_refuses_to_start_without_tokens_or_with_no_auth_off_loopback(tmp_path, args, why):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice alice-token-0123456789abcdef\n")
    args = [a.replace("{tokens}", str(tokens)) for a in args]
    result = CliRunner().invoke(main, ["gateway", "--broker", "tcp://127.0.0.1:1", *args])
    assert result.exit_code == 1 and why in result.output, result.output


def test_bad_token_file_and_half_tls_are_clear_errors(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice short\n")
    result = CliRunner().invoke(main, ["gateway", "--tokens", str(tokens)])
    assert result.exit_code == 1 and "shorter than 16" in result.output
    result = CliRunner().invoke(main, ["gateway", "--tls-cert", str(tokens)])
    assert result.exit_code == 1 and "both --tls-cert and --tls-key" in result.output


def test_gateway_config_file_keys_are_its_options(tmp_path):
    conf = tmp_path / "gateway.toml"
    shipped = (ROOT / "systemd" / "gateway.toml").read_text()
    assert 'grpc = "127.0.0.1:8551"' in shipped
    conf.write_text(shipped.replace('grpc = "127.0.0.1:8551"', 'grpc = "0.0.0.0:0"'))
    result = CliRunner().invoke(main, ["gateway", "--config", str(conf)])
    assert result.exit_code == 1 and "refusing to serve 0.0.0.0:0" in result.output  # the file's grpc was read
    conf.write_text("htp = '127.0.0.1:1'\n")
    result = CliRunner().invoke(main, ["gateway", "--config", str(conf)])
    assert result.exit_code == 2 and "unknown setting 'htp'" in result.output


async def test_gateway_daemon_notifies_reloads_tokens_on_sighup_and_stops_on_sigterm(tmp_path, broker):
    """The broker runs on this test's loop, so every wait here yields to it."""
    import httpx

    listener = NotifyListener(tmp_path / "notify.sock")
    tokens = tmp_path / "tokens"
    tokens.write_text("alice alice-token-0123456789abcdef\n")
    port = free_port()
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "600000"}
    proc = subprocess.Popen([*NSD, "gateway", "--broker", broker.endpoints["clients"], "--http", f"127.0.0.1:{port}",
                             "--grpc", f"127.0.0.1:{free_port()}", "--tokens", str(tokens)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ready = await asyncio.to_thread(listener.read_until, "READY", 60)
        assert ready["READY"] == "1" and f"127.0.0.1:{port}" in ready["STATUS"]
        assert (await asyncio.to_thread(listener.read_until, "WATCHDOG", 10))["WATCHDOG"] == "1"
        http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30)
        url = "/v1/cluster"
        alice = {"Authorization": "Bearer alice-token-0123456789abcdef"}
        bob = {"Authorization": "Bearer bob-token-0123456789abcdefg"}
        assert (await http.get(url, headers=alice)).status_code == 200
        tokens.write_text("bob bob-token-0123456789abcdefg\n")
        proc.send_signal(signal.SIGHUP)
        await asyncio.to_thread(listener.read_until, "RELOADING", 10)
        await asyncio.to_thread(listener.read_until, "READY", 10)
        assert (await http.get(url, headers=alice)).status_code == 401
        assert (await http.get(url, headers=bob)).status_code == 200
        await http.aclose()
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(listener.read_until, "STOPPING", 30)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            kill_pid(proc.pid)
            proc.wait(10)
        proc.stderr.close()
        listener.close()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_gateway_unit_passes_systemd_analyze_verify(tmp_path):
    text = (ROOT / "systemd" / "nsd-gateway.service").read_text()
    assert "Type=notify" in text and "WatchdogSec=" in text and "ExecReload=" in text
    unit = tmp_path / "nsd-gateway.service"
    unit.write_text(text.replace("/opt/nsd/bin/nsd", shutil.which("nsd") or sys.executable))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
