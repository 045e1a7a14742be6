"""Shared fixtures: a real broker on random loopback ports, real worker daemons, real clients.

Every fixture stops what it started: sockets are closed (their contexts terminated, which the
teardown checks) and runner processes are killed by PID.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nsd.broker.config import BrokerConfig
from nsd.broker.daemon import Broker
from nsd.client.api import AsyncClient
from nsd.worker.daemon import WorkerConfig, WorkerDaemon

pytest_plugins = ["tests.gateway_fixtures"]  # the gateway fixtures, for every test module

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"
RECIPES = Path(__file__).resolve().parent / "recipes"
TEST_RUNNER_ENV = ("NSD_TEST_SLOW_S", "NSD_TEST_HANG")  # what the test recipes read; runners get only what is named


@pytest.fixture(autouse=True)
def _recipe_paths_do_not_leak(monkeypatch):
    """A test that runs a runner's TaskCache in this process sets NSD_MODEL_PATH / NSD_DATA_PATH here;
    undo that after every test so that recipes loaded later find their own files."""
    for var in ("NSD_MODEL_PATH", "NSD_DATA_PATH"):
        monkeypatch.setenv(var, "")  # records the original state, restored at teardown
        monkeypatch.delenv(var)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.call_failed = report.failed
    return report


@pytest.fixture(autouse=True)
def _scripted_workers_are_stopped(request):
    """A test that fails before its `stop()` would leave a scripted worker's socket to be collected
    during some later test, and fail that one; close them here. A passing test must stop its own."""
    from tests.peers import ScriptedWorker

    yield
    left = list(ScriptedWorker.live)
    for worker in left:
        worker.close()
    if left and not getattr(request.node, "call_failed", True):
        pytest.fail(f"the test left {len(left)} scripted worker(s) running: {[w.worker_id for w in left]}")


@pytest.fixture(autouse=True)
def _runner_processes_only_in_slow_tests(request, monkeypatch):
    """`make test-fast` is the cheap tests: one that starts a runner process (seconds each: torch and INC
    imports) must be marked slow. Runners start as they always do; one started here fails the test after."""
    from nsd.worker.slots import RunnerProcess

    started = []
    start = RunnerProcess.start

    async def counted(runner):
        started.append(runner)
        return await start(runner)

    monkeypatch.setattr(RunnerProcess, "start", counted)
    yield
    if started and request.node.get_closest_marker("slow") is None and not getattr(request.node, "call_failed", True):
        pytest.fail(f"this test started {len(started)} runner process(es): mark it @pytest.mark.slow")


@pytest.fixture
async def broker(tmp_path):
    b = Broker(BrokerConfig(state_dir=tmp_path / "state", clients="tcp://127.0.0.1:*", workers="tcp://127.0.0.1:*",
               events="tcp://127.0.0.1:*", heartbeat_s=0.5, liveness=6))
    await b.start()
    yield b
    await b.stop()
    assert b.ctx is None


@pytest.fixture
async def client(broker):
    c = AsyncClient(broker.endpoints["clients"], timeout_s=10, idle_resnapshot_s=0.5)
    yield c
    await c.close()
    assert c.ctx.closed


@pytest.fixture
async def start_workers(broker, tmp_path, tmp_path_factory):
    """start_workers(n): n real worker daemons (1 core each, round-robin), runners warm (and sandboxed),
    registered. Their runners may read this checkout and pytest's temporary folders (model.shared = true
    tasks), less their worker's own cache."""
    started: list[tuple[WorkerDaemon, asyncio.Task]] = []

    async def start(n: int, **overrides) -> list[WorkerDaemon]:
        cpus = sorted(os.sched_getaffinity(0))
        new = []
        for i in range(len(started), len(started) + n):
            settings = {"broker": broker.endpoints["workers"], "cpus": [cpus[i % len(cpus)]],
                        "cache_dir": tmp_path / f"worker{i}", "worker_id": f"w{i}", "heartbeat_s": 0.5,
                        "shared_dirs": [ROOT, tmp_path_factory.getbasetemp()], "runner_env": list(TEST_RUNNER_ENV), **overrides}
            config = WorkerConfig(**settings)
            daemon = WorkerDaemon(config)
            started.append((daemon, asyncio.create_task(daemon.run())))
            new.append(daemon)
        await asyncio.wait_for(asyncio.gather(*(d.registered.wait() for d in new)), 60)
        return new

    yield start
    pids = [s.runner.proc.pid for d, _ in started for s in d.slots if s.runner.proc is not None]
    for daemon, _ in started:
        daemon.stop(grace_s=5)
    await asyncio.wait_for(asyncio.gather(*(t for _, t in started), return_exceptions=True), 30)
    for daemon, _ in started:
        assert daemon.ctx.closed
    for pid in pids:  # every runner this fixture caused must be gone
        assert not _alive(pid), f"runner {pid} survived its worker"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie not yet reaped counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # the name in (...) may hold spaces
    except OSError:
        return False


def digits_spec(**tuning) -> dict:
    """The digits example's spec with absolute paths and overrides in [tuning]."""
    from nsd.client.specs import read_spec

    spec = read_spec(DIGITS / "task.toml")
    spec["tuning"].update(tuning)
    return spec


UNDISTURBED_WINNER = (2, 350 / 360)  # digits example: trial 2 (rtn bits=3, per channel): 350 of 360 right


def slow_spec(seconds: float) -> dict:
    spec = digits_spec()
    spec["recipe"]["file"] = str(RECIPES / "slow.py")
    spec["model"]["shared"] = True
    spec["tuning"]["max_trials"] = 6
    return spec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_for(predicate, timeout: float = 60, interval: float = 0.05):
    """Wait until `predicate()` (a plain function or a coroutine function) gives something true; return it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(interval)


def kill_pid(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture
def broker_process(tmp_path):
    """A real `nsd broker` process on free loopback ports: (Popen, endpoints); killed by PID at the end."""
    ports = [free_port() for _ in range(3)]
    endpoints = {name: f"tcp://127.0.0.1:{port}" for name, port in zip(("clients", "workers", "events"), ports)}
    log = open(tmp_path / "broker.log", "w")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "nsd", "broker", "--state-dir", str(tmp_path / "state"),
                             *(f"--{name}={ep}" for name, ep in endpoints.items())], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    yield proc, endpoints
    kill_pid(proc.pid, signal.SIGKILL)
    proc.wait(10)
    log.close()


async def hello(endpoint: str, timeout: float = 10) -> dict:
    client = AsyncClient(endpoint, timeout_s=timeout)
    try:
        return await client.hello()
    finally:
        await client.close()


async def hello_ok(endpoint: str) -> bool:
    try:
        return bool(await hello(endpoint, timeout=2))
    except Exception:
        return False


class Tenants:
    """A CURVE broker with a key per role (README "Privacy"): clients alice and bob (code), mallory (no code),
    gateways gw (code) and gw0, admin root, workers node1 (trusted) and evil. `client(name)` connects as
    that key; `keys(name)` is its ClientKeys (for scripted workers and raw sockets). Closed at teardown."""

    ROLES = {"alice": ("client", True), "bob": ("client", True), "mallory": ("client", False),
             "gw": ("gateway", True), "gw0": ("gateway", False), "root": ("admin", False),
             "node1": ("worker", False), "evil": ("worker", False)}

    def __init__(self, tmp_path: Path):
        from nsd.security import allow, generate_keypair

        self.tmp_path, self.keys_dir = tmp_path, tmp_path / "keys"
        made = {name: generate_keypair(tmp_path / "made", name) for name in ("broker", *self.ROLES)}
        for name, (role, code) in self.ROLES.items():
            allow(self.keys_dir, role, made[name][0], code=code, trusted=name == "node1")
        self.secret = {name: secret for name, (_, secret) in made.items()}
        self.server = made["broker"][0]
        self.broker: Broker | None = None
        self.clients: list[AsyncClient] = []

    async def start(self, **config) -> Broker:
        self.broker = Broker(BrokerConfig(state_dir=self.tmp_path / "state", clients="tcp://127.0.0.1:*",
                                          workers="tcp://127.0.0.1:*", events="tcp://127.0.0.1:*",
                                          curve_secret=self.secret["broker"], keys_dir=self.keys_dir,
                                          heartbeat_s=0.5, liveness=6, **config))
        await self.broker.start()
        return self.broker

    def client(self, name: str, timeout_s: float = 10) -> AsyncClient:
        c = AsyncClient(self.broker.endpoints["clients"], timeout_s=timeout_s, idle_resnapshot_s=0.3,
                        curve_key=self.secret[name], server_key=self.server)
        self.clients.append(c)
        return c

    def keys(self, name: str):
        from nsd.security import ClientKeys

        return ClientKeys.load(self.secret[name], self.server)

    async def close(self) -> None:
        for c in self.clients:
            await c.close()
        if self.broker is not None:
            await self.broker.stop()


@pytest.fixture
async def tenants(tmp_path):
    """Tenants(tmp_path), its broker started with the default settings (`tenants.start(**config)` again
    for others is not supported: use the `tenants_keys` fixture and start it yourself)."""
    t = Tenants(tmp_path)
    await t.start()
    yield t
    await t.close()


@pytest.fixture
async def tenants_keys(tmp_path):
    """Tenants(tmp_path) whose broker the test starts (`await tenants_keys.start(share_cache=True)`)."""
    t = Tenants(tmp_path)
    yield t
    await t.close()


@pytest.fixture
async def secure(tmp_path):
    """A CURVE broker: (broker, {name: secret key file}, the broker's public key file); alice may connect as a
    client and node1 as a worker, mallory's key is allowed nowhere."""
    from nsd.security import allow, generate_keypair

    keys = tmp_path / "keys"
    made = {name: generate_keypair(tmp_path / "made", name) for name in ("broker", "alice", "node1", "mallory")}
    allow(keys, "client", made["alice"][0], code=True)  # its tasks run a python recipe
    allow(keys, "worker", made["node1"][0])
    broker = Broker(BrokerConfig(state_dir=tmp_path / "state", clients="tcp://127.0.0.1:*", workers="tcp://127.0.0.1:*",
                    events="tcp://127.0.0.1:*", curve_secret=made["broker"][1], keys_dir=keys, heartbeat_s=0.5))
    await broker.start()
    yield broker, {name: secret for name, (_, secret) in made.items()}, made["broker"][0]
    await broker.stop()


@pytest.fixture
async def fake_and_worker(tmp_path):
    """A real worker daemon registered with a fake broker (tests.peers.FakeBroker): (fake, daemon, its task)."""
    from nsd.protocol import Cmd
    from tests.peers import FakeBroker

    fake = FakeBroker()
    config = WorkerConfig(broker=fake.endpoint, cpus=[sorted(os.sched_getaffinity(0))[0]],
                          cache_dir=tmp_path / "worker", worker_id="victim", chunk_timeout_s=30)
    daemon = WorkerDaemon(config)
    run = asyncio.create_task(daemon.run())
    await wait_for(lambda: bool(fake.of(Cmd.READY)), 30)
    # Long liveness: the fake broker does not ping, and the worker must not reconnect mid-test.
    fake.send(Cmd.READY_ACK, {"heartbeat_s": 1.0, "liveness": 100})
    await asyncio.wait_for(daemon.registered.wait(), 10)
    yield fake, daemon, run
    pids = [s.runner.proc.pid for s in daemon.slots if s.runner.proc is not None]
    daemon.stop(grace_s=0)
    await asyncio.wait_for(run, 30)  # raises if the daemon crashed
    await fake.close()
    assert daemon.ctx.closed and not any(_alive(pid) for pid in pids)


def tiny_encoder(root: Path, hidden: int = 128, layers: int = 2) -> dict[str, Path]:
    """A small BERT encoder with random weights, its tokenizer and sentences of one length (every evaluation
    batch has one shape): for the feature-extraction recipe, whose cosine to FP32 needs no training."""
    import random

    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ("the cat dog sat on a mat and ran far away from home very quickly slowly red blue green big small "
             "old new bird tree").split()
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(root / "vocab.txt"), model_max_length=64)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=4, intermediate_size=4 * hidden, max_position_embeddings=64),
                      add_pooling_layer=False)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(0)
    (root / "sentences.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(10))
                                                  for _ in range(64)) + "\n")
    return {"model": root / "model", "sentences": root / "sentences.txt"}
