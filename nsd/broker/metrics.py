"""The broker's Prometheus metrics (`nsd broker --metrics HOST:PORT`), with prometheus_client: its counters
and histogram, its text exposition and HTTP server (a daemon thread), and its `process_*` metrics.

What the broker's code counts goes into `Metrics`, one registry per broker (tests run several brokers in
one process). What describes the broker's state now (tasks by state, workers, slots, queue) is read from
the core when Prometheus scrapes, on the broker's own event loop: the core is not thread-safe, and the
hot path then pays nothing for those gauges.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics,
                               make_wsgi_app)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
SCRAPE_TIMEOUT_S = 5.0  # a scrape waits this long for the broker's loop, and a silent HTTP client is dropped after it


class Metrics:
    """The broker's counters and its dispatch-latency histogram (README "Metrics" names each)."""

    def __init__(self) -> None:
        disable_created_metrics()  # no `*_created` series: the page shows what it always showed
        self.registry = registry = CollectorRegistry()
        self.trials_finished = Counter("nsd_trials_finished", "Trials finished, by final state.", ["state"],
                                       registry=registry)
        self.trials_requeued = Counter("nsd_trials_requeued", "Trials run again after losing a worker.",
                                       registry=registry)
        self.jobs_dispatched = Counter("nsd_jobs_dispatched", "Jobs assigned to workers.", registry=registry)
        self.ignored_results = Counter("nsd_ignored_results", "Results not from the worker holding the lease "
                                       "(duplicate, late or forged).", registry=registry)
        self.refused_workers = Counter("nsd_refused_workers", "Registrations refused: worker id bound to another "
                                       "key.", registry=registry)
        self.storage_errors = Counter("nsd_storage_errors", "Transactions SQLite could not commit.",
                                      registry=registry)
        self.dropped_sends = Counter("nsd_dropped_sends", "Messages dropped because the peer's send queue was "
                                     "full.", registry=registry)
        self.dispatch_latency = Histogram("nsd_dispatch_latency_seconds", "From a slot freeing to its next job "
                                          "being assigned.", buckets=LATENCY_BUCKETS, registry=registry)
        ProcessCollector(registry=registry)
        self._finished_in: dict[str, Counter] = {}  # a label's child, looked up once (labels() costs microseconds)

    def trial_finished(self, state: str) -> None:
        child = self._finished_in.get(state)
        if child is None:
            child = self._finished_in[state] = self.trials_finished.labels(state)
        child.inc()

    def value(self, name: str, **labels: str) -> float:
        """One sample's value as a scrape would show it (0 when it has none yet), e.g.
        `value("nsd_storage_errors_total")`."""
        return self.registry.get_sample_value(name, labels) or 0.0


class BrokerState(Collector):
    """The gauges (and the bad-message counter) read from the broker at scrape time, on its loop.

    `read` returns {"tasks": {state: n}, "workers", "slots", "busy", "queue_depth", "bad_messages"}."""

    def __init__(self, read: Callable[[], dict], loop: asyncio.AbstractEventLoop):
        self._read, self._loop = read, loop

    async def _read_on_loop(self) -> dict:
        return self._read()

    def collect(self):
        state = asyncio.run_coroutine_threadsafe(self._read_on_loop(), self._loop).result(SCRAPE_TIMEOUT_S)
        tasks = GaugeMetricFamily("nsd_tasks", "Tasks by state.", labels=["state"])
        for name, n in sorted(state["tasks"].items()):
            tasks.add_metric([name], n)
        yield tasks
        yield CounterMetricFamily("nsd_bad_messages", "Malformed messages dropped.", value=state["bad_messages"])
        for name, key, about in (("nsd_workers_alive", "workers", "Registered, heartbeating workers."),
                                 ("nsd_slots", "slots", "Slots across the cluster."),
                                 ("nsd_slots_busy", "busy", "Slots running a job."),
                                 ("nsd_queue_depth", "queue_depth", "Jobs waiting for a slot.")):
            yield GaugeMetricFamily(name, about, value=state[key])
        if "pair" in state:
            yield from pair_families(state["pair"])

    def describe(self):
        return []  # nothing to check at registration: reading the state there would wait on the loop itself


def pair_families(pair: dict):
    """A broker pair's metrics (nsd.broker.peer.Pair.metric_values)."""
    states = GaugeMetricFamily("nsd_pair_state", "This broker's state in its pair (1 for the current one).",
                               labels=["state"])
    for name in pair["states"]:
        states.add_metric([name], int(name == pair["state"]))
    yield states
    for name, key, about in (
            ("nsd_pair_epoch", "epoch", "The active term this broker's history has reached."),
            ("nsd_pair_lsn", "lsn", "Transactions committed (serving) or applied (passive) here."),
            ("nsd_pair_peer_behind", "behind", "Transactions the passive broker has not confirmed yet (serving broker)."),
            ("nsd_pair_peer_heard_seconds", "heard_s", "Seconds since the other broker was last heard (-1: never)."),
            ("nsd_pair_held", "held", "Effects waiting for the passive broker.")):
        yield GaugeMetricFamily(name, about, value=pair[key])
    yield CounterMetricFamily("nsd_pair_takeovers", "Times this broker started to serve.", value=pair["takeovers"])
    yield CounterMetricFamily("nsd_pair_stepdowns", "Times this broker stopped serving.", value=pair["stepdowns"])


class _Handler(WSGIRequestHandler):
    timeout = SCRAPE_TIMEOUT_S  # a client that sends nothing does not hold its thread for ever

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's signature
        pass  # Prometheus scrapes every few seconds: not worth a log line each


class MetricsServer:
    """prometheus_client's WSGI app on a threading HTTP server (a daemon thread) for one registry."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        server_class = ThreadingWSGIServer if ":" not in host else \
            type("ThreadingWSGIServer6", (ThreadingWSGIServer,), {"address_family": socket.AF_INET6})
        self._server = make_server(host, port, make_wsgi_app(registry), server_class, handler_class=_Handler)
        self.address = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="nsd-metrics", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        await asyncio.to_thread(self._server.shutdown)  # returns once serve_forever has
        self._thread.join()
        self._server.server_close()
