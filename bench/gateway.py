#!/usr/bin/env python
"""The gateway's door under the loads of issue 15 (attacks 4 and 5), against its own unloaded answer time.

    python bench/gateway.py                          # 1,000 slow heads; 100 streams on a 5,000-trial task
    python bench/gateway.py --streams 300 --trials 20000   # the issue's size (heavier: minutes)

A real broker and a real gateway run as their daemons (`python -m nsd broker`, `python -m nsd gateway
--no-auth`, subprocesses on free loopback ports). A simulated worker (a DEALER speaking nsd.protocol)
plans the task's trials and finishes one every `--trial-s`, so the streams carry events all along. The
"victim" is another client asking `GET /v1/tasks` and `GET /healthz`; its answer times are measured
with no load (the baseline), beside `--slow` connections that each sent part of a request head (from
127.0.0.2), and beside `--streams` SSE streams that read the task's events. Printed: p50 / p90 / max of
the victim's time and each against the baseline, the gateway's RSS and its CPU use meanwhile (100 %: one
core). All clients here share 127.0.0.1,
so the gateway is started with a per-client cap above the stream count (`--streams` + 50), which the slow
heads (from 127.0.0.2) meet too.
Every process this starts is killed by PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import zmq
import zmq.asyncio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nsd.client.api import AsyncClient  # noqa: E402
from nsd.limits import raise_open_files_limit  # noqa: E402
from nsd.protocol import BROKER_TO_WORKER, PROTOCOL_VERSION, Cmd, pack, unpack  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


async def simulated_worker(endpoint: str, trials: int, trial_s: float, stop: asyncio.Event) -> None:
    """Registers, plans `trials` configs, then finishes one trial every `trial_s` (metric 0: none passes)."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"bench-w")
    sock.connect(endpoint)
    ready = pack(Cmd.READY, {"worker_id": "bench-w", "boot_id": "b", "host": "bench", "cores": 1, "slots": 1,
                             "version": PROTOCOL_VERSION, "running": [], "outbox": []})
    sock.send_multipart(ready)
    held: list[tuple[str, int]] = []
    next_beat = next_finish = time.monotonic()
    try:
        while not stop.is_set():
            if await sock.poll(50):
                msg = unpack(await sock.recv_multipart(), BROKER_TO_WORKER)
                if msg.cmd is Cmd.DISCONNECT:  # declared dead (this process was busy): register again
                    held.clear()
                    sock.send_multipart(ready)
                elif msg.cmd is Cmd.ASSIGN:
                    key, job = (msg.body["trial_id"], msg.body["attempt"]), msg.body["job"]
                    if job["kind"] == "plan":
                        configs = [{"config": {"rtn": {"bits": i}}, "label": f"rtn(bits={i})"} for i in range(trials)]
                        sock.send_multipart(pack(Cmd.RESULT, {"trial_id": key[0], "attempt": key[1], "seconds": 0.01,
                                                              "ok": True, "configs": configs}))
                    elif job["kind"] == "baseline":  # the FP32 metric is a job of its own beside the trials
                        sock.send_multipart(pack(Cmd.RESULT, {"trial_id": key[0], "attempt": key[1], "seconds": 0.01,
                                                              "ok": True, "baseline": 1.0}))
                    else:
                        held.append(key)
            now = time.monotonic()
            if held and now >= next_finish:
                key = held.pop(0)
                sock.send_multipart(pack(Cmd.RESULT, {"trial_id": key[0], "attempt": key[1], "seconds": 0.01,
                                                      "ok": True, "metric": 0.0}))
                next_finish = now + trial_s
            if now >= next_beat:
                sock.send_multipart(pack(Cmd.HEARTBEAT, {"running": [list(k) for k in held]}))
                next_beat = now + 0.5
    finally:
        sock.close(linger=0)
        ctx.term()


async def victim(base: str, repeats: int, pid: int | None = None, broker_pid: int | None = None) -> list[float]:
    times = []
    used, since = (cpu_s(pid), time.monotonic()) if pid else (0.0, 0.0)
    broker_used = cpu_s(broker_pid) if broker_pid else 0.0
    async with httpx.AsyncClient(base_url=base, timeout=300) as http:
        for _ in range(repeats):
            started = time.perf_counter()
            assert (await http.get("/v1/tasks")).status_code == 200
            assert (await http.get("/healthz")).status_code == 200
            times.append(time.perf_counter() - started)
            await asyncio.sleep(0.05)
    if pid:
        victim.gateway_cpu = (cpu_s(pid) - used) / (time.monotonic() - since)
    if broker_pid:
        victim.broker_cpu = (cpu_s(broker_pid) - broker_used) / (time.monotonic() - since)
    return times


async def stream_reader(http: httpx.AsyncClient, task_id: str, seen: list[int], started: list[int]) -> None:
    with contextlib.suppress(httpx.HTTPError, asyncio.CancelledError):
        async with http.stream("GET", f"/v1/tasks/{task_id}/events") as answer:
            assert answer.status_code == 200, answer.status_code
            first = True
            async for line in answer.aiter_lines():
                if line.startswith("id: "):
                    seen[0] += 1
                    started[0] += first
                    first = False


async def read_streams(base: str, task_id: str, n: int) -> None:
    """`--read`: n SSE streams on the task; says `ready` once each has its first event, reads until stdin
    closes, then prints how many events they received in all."""
    seen, started = [0], [0]
    async with httpx.AsyncClient(base_url=base, timeout=None, limits=httpx.Limits(max_connections=n + 10)) as http:
        tasks = [asyncio.create_task(stream_reader(http, task_id, seen, started)) for _ in range(n)]
        while started[0] < n:
            await asyncio.sleep(0.1)
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.read)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    print(seen[0], flush=True)


def slow_heads(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
        with contextlib.suppress(OSError):
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        socks.append(s)
    return socks


def row(name: str, times: list[float], baseline: list[float] | None, extra: str = "") -> str:
    p50, p90 = statistics.median(times), sorted(times)[int(0.9 * (len(times) - 1))]
    ratio = f"{p50 / statistics.median(baseline):7.2f}" if baseline else "   1.00"
    return f"{name:<34} {p50 * 1000:9.1f} {p90 * 1000:9.1f} {max(times) * 1000:9.1f} {ratio}  {extra}"


async def amain(args) -> None:
    raise_open_files_limit()
    tmp = Path(tempfile.mkdtemp(prefix="nsd-bench-gateway-"))
    ports = {name: free_port() for name in ("clients", "workers", "events", "http")}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "nsd", "broker", "--state-dir", str(tmp / "state"),
                               *(f"--{n}=tcp://127.0.0.1:{ports[n]}" for n in ("clients", "workers", "events"))],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    procs.append(subprocess.Popen([sys.executable, "-m", "nsd", "gateway", "--no-auth", "--grpc", "",
                                   "--broker", f"tcp://127.0.0.1:{ports['clients']}", "--http", f"127.0.0.1:{ports['http']}",
                                   "--max-streams-per-token", str(args.streams + 10),
                                   # every client here is 127.0.0.1: let one address hold all the streams
                                   "--max-connections-per-client", str(args.streams + 50)],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    gateway_pid, base = procs[1].pid, f"http://127.0.0.1:{ports['http']}"
    stop = asyncio.Event()
    worker = asyncio.create_task(simulated_worker(f"tcp://127.0.0.1:{ports['workers']}", args.trials, args.trial_s, stop))
    client = AsyncClient(f"tcp://127.0.0.1:{ports['clients']}", timeout_s=60)
    try:
        async with httpx.AsyncClient(base_url=base, timeout=5) as probe:
            for _ in range(600):
                with contextlib.suppress(httpx.HTTPError):
                    if (await probe.get("/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
        print(f"{'victim: GET /v1/tasks + /healthz':<34} {'p50 ms':>9} {'p90 ms':>9} {'max ms':>9} {'x base':>7}")
        baseline = await victim(base, args.repeats, gateway_pid)
        print(row("no load (baseline)", baseline, None, f"gateway RSS {rss_mib(gateway_pid):.0f} MiB, "
                  f"CPU {victim.gateway_cpu:.0%}"))

        socks = await asyncio.to_thread(slow_heads, ports["http"], args.slow)
        try:
            times = await victim(base, args.repeats, gateway_pid)
            print(row(f"beside {args.slow} slow request heads", times, baseline, f"CPU {victim.gateway_cpu:.0%}"))
        finally:
            for s in socks:
                s.close()

        spec = {"name": "bench", "recipe": {"kind": "python", "file": os.path.abspath(__file__)},
                "tuning": {"config_set": [{"rtn": {"bits": list(range(args.trials))}}], "max_trials": args.trials,
                           "tolerable_loss": 0.01}}
        task_id = await client.submit(spec)
        while (task := (await client.request(Cmd.STATUS, task_id=task_id, limit=1))["task"])["state"] != "tuning":
            if task["state"] in ("failed", "cancelled", "done"):
                raise SystemExit(f"the task ended before the streams joined: {task['state']}: {task.get('error')}")
            await asyncio.sleep(0.2)
        # The readers run in a process of their own: parsing 300 streams would otherwise slow this
        # process's loop, and with it the victim's own measurement.
        readers = subprocess.Popen([sys.executable, __file__, "--read", base, task_id, str(args.streams)],
                                   env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(readers)
        ready = await asyncio.to_thread(readers.stdout.readline)  # the simulated worker keeps running meanwhile
        assert ready.strip() == "ready", ready
        print(f"(gateway pid {gateway_pid}: every stream has its snapshot)", flush=True)
        done_before = (await client.list())[0]["trials_done"]
        times = await victim(base, args.repeats, gateway_pid, procs[0].pid)
        done_during = (await client.list())[0]["trials_done"] - done_before
        print(row(f"beside {args.streams} streams, {args.trials} trials", times, baseline,
                  f"gateway RSS {rss_mib(gateway_pid):.0f} MiB, CPU {victim.gateway_cpu:.0%}; "
                  f"broker CPU {victim.broker_cpu:.0%}"))
        readers.stdin.close()
        delivered = (await asyncio.to_thread(readers.stdout.readline)).strip()
        print(f"{delivered} events delivered to the streams in all; {done_during} trials ended while measured")
    finally:
        stop.set()
        await worker
        await client.close()
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)


def main() -> None:
    if sys.argv[1:2] == ["--read"]:
        asyncio.run(read_streams(sys.argv[2], sys.argv[3], int(sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slow", type=int, default=1000, help="half-open connections sending a slow head")
    parser.add_argument("--streams", type=int, default=100, help="SSE streams on the task")
    parser.add_argument("--trials", type=int, default=5000, help="trials of the task the streams follow")
    parser.add_argument("--trial-s", type=float, default=0.05, help="a trial ends every this many seconds")
    parser.add_argument("--repeats", type=int, default=20, help="victim requests per load")
    asyncio.run(amain(parser.parse_args()))


if __name__ == "__main__":
    main()
