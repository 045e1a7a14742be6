"""Prometheus text exposition for the broker (`nsd broker --metrics 127.0.0.1:9550`), on a tiny
asyncio HTTP endpoint: no client library, nothing but GET /metrics."""

from __future__ import annotations

import asyncio
import bisect
from dataclasses import dataclass, field
from typing import Callable

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]
        return out


@dataclass
class Metrics:
    trials_finished: dict[str, int] = field(default_factory=dict)  # by final state
    trials_requeued: int = 0
    jobs_dispatched: int = 0
    ignored_results: int = 0  # results not from the lease holder (duplicates, late, forged)
    refused_workers: int = 0  # registrations refused (a worker id bound to another key)
    storage_errors: int = 0  # transactions SQLite could not commit
    dropped_sends: int = 0  # messages not queued for a peer that does not read (its queue is full)
    bad_messages: Callable[[], int] = lambda: 0
    dispatch_latency: Histogram = field(default_factory=Histogram)  # slot freed -> its next job assigned

    def trial_finished(self, state: str) -> None:
        self.trials_finished[state] = self.trials_finished.get(state, 0) + 1


def render(metrics: Metrics, tasks_by_state: dict[str, int], workers: int, slots: int, busy: int,
           queue_depth: int) -> str:
    lines = ["# HELP nsd_tasks Tasks by state.", "# TYPE nsd_tasks gauge"]
    lines += [f'nsd_tasks{{state="{s}"}} {n}' for s, n in sorted(tasks_by_state.items())]
    lines += ["# HELP nsd_trials_finished_total Trials finished, by final state.",
              "# TYPE nsd_trials_finished_total counter"]
    lines += [f'nsd_trials_finished_total{{state="{s}"}} {n}' for s, n in sorted(metrics.trials_finished.items())]
    for name, kind, value, about in (
            ("nsd_trials_requeued_total", "counter", metrics.trials_requeued, "Trials run again after losing a worker."),
            ("nsd_jobs_dispatched_total", "counter", metrics.jobs_dispatched, "Jobs assigned to workers."),
            ("nsd_bad_messages_total", "counter", metrics.bad_messages(), "Malformed messages dropped."),
            ("nsd_ignored_results_total", "counter", metrics.ignored_results,
             "Results not from the worker holding the lease (duplicate, late or forged)."),
            ("nsd_refused_workers_total", "counter", metrics.refused_workers,
             "Registrations refused: worker id bound to another key."),
            ("nsd_storage_errors_total", "counter", metrics.storage_errors, "Transactions SQLite could not commit."),
            ("nsd_dropped_sends_total", "counter", metrics.dropped_sends,
             "Messages dropped because the peer's send queue was full."),
            ("nsd_workers_alive", "gauge", workers, "Registered, heartbeating workers."),
            ("nsd_slots", "gauge", slots, "Slots across the cluster."),
            ("nsd_slots_busy", "gauge", busy, "Slots running a job."),
            ("nsd_queue_depth", "gauge", queue_depth, "Jobs waiting for a slot.")):
        lines += [f"# HELP {name} {about}", f"# TYPE {name} {kind}", f"{name} {value}"]
    lines += ["# HELP nsd_dispatch_latency_seconds From a slot freeing to its next job being assigned.",
              "# TYPE nsd_dispatch_latency_seconds histogram"]
    lines += metrics.dispatch_latency.lines("nsd_dispatch_latency_seconds")
    return "\n".join(lines) + "\n"


def render_pair(status: dict, states: list[str], takeovers: int, stepdowns: int) -> str:
    """A broker pair's lines (nsd.broker.peer.Pair.status)."""
    peer = status["peer"] or {}
    lines = ["# HELP nsd_pair_state This broker's state in its pair (1 for the current one).",
             "# TYPE nsd_pair_state gauge"]
    lines += [f'nsd_pair_state{{state="{s}"}} {int(s == status["state"])}' for s in states]
    for name, kind, value, about in (
            ("nsd_pair_epoch", "gauge", status["epoch"], "The active term this broker's history has reached."),
            ("nsd_pair_lsn", "gauge", status["lsn"], "Transactions committed (serving) or applied (passive) here."),
            ("nsd_pair_peer_behind", "gauge", peer.get("behind") or 0,
             "Transactions the passive broker has not confirmed yet (on the serving broker)."),
            ("nsd_pair_peer_heard_seconds", "gauge", peer.get("heard_s", -1),
             "Seconds since the other broker was last heard (-1: never)."),
            ("nsd_pair_held", "gauge", status["held"], "Effects waiting for the passive broker."),
            ("nsd_pair_takeovers_total", "counter", takeovers, "Times this broker started to serve."),
            ("nsd_pair_stepdowns_total", "counter", stepdowns, "Times this broker stopped serving.")):
        lines += [f"# HELP {name} {about}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"


async def serve(host: str, port: int, page: Callable[[], str]) -> asyncio.AbstractServer:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            if request.split(b" ")[:2] == [b"GET", b"/metrics"]:
                body, status = page().encode(), "200 OK"
            else:
                body, status = b"try GET /metrics\n", "404 Not Found"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
