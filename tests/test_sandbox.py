"""Runner sandboxes: what a runner sees and may do (pure checks of the bwrap command line and of what the
worker takes from a runner), then real workers, real runners and real bwrap against hostile recipes: one that
tries to reach everything it must not, one that tampers with its runner for the next task."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import msgpack
import pytest

from nsd.blobs import BlobMemberError, pack_tree
from nsd.broker.config import BrokerConfig
from nsd.broker.daemon import Broker
from nsd.client.api import AsyncClient
from nsd.local import sandbox_works
from nsd.protocol import MAX_BODY, Cmd
from nsd.security import allow, generate_keypair
from nsd.worker import checks
from nsd.worker.daemon import WorkerConfig, WorkerDaemon
from nsd.worker.sandbox import (Layout, RunnerDirs, SandboxError, bwrap_argv, expose, layout, link_tree, runner_env,
                                take)
from tests.conftest import DIGITS, digits_spec


# ------------------------------------------------------------------ what a runner sees (pure, no processes)

def test_the_command_line_unshares_everything_and_binds_only_what_is_listed():
    lay = Layout(links=(("/bin", "usr/bin"),), binds=("/usr", "/venv"), shared=("/data",),
                 masks=(("/data/cache", True), ("/venv/key_secret", False)))
    argv = bwrap_argv(lay, "/c/runners/w/0/scratch", "/c/runners/w/0/files", ["python", "-m", "nsd.worker.runner"])
    assert argv[0] == "bwrap" and argv[-4:] == ["--", "python", "-m", "nsd.worker.runner"]
    for flag in ("--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session"):
        assert flag in argv
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    pairs = [(argv[i], argv[i + 1], argv[i + 2]) for i in range(len(argv) - 2) if argv[i].startswith("--")]
    assert ("--ro-bind", "/usr", "/usr") in pairs and ("--ro-bind", "/data", "/data") in pairs
    assert ("--ro-bind", "/dev/null", "/venv/key_secret") in pairs  # a key inside a bind is hidden...
    assert argv[argv.index("/data/cache") - 1] == "--tmpfs"  # ...and so is the cache inside a shared dir
    writable = [argv[i + 1] for i, a in enumerate(argv) if a == "--bind"]
    assert writable == ["/c/runners/w/0/scratch/tmp", "/c/runners/w/0/scratch"]  # its own scratch, nothing else
    assert ("--ro-bind", "/c/runners/w/0/files", "/c/runners/w/0/files") in pairs
    # Masks lie over the binds they hide in, and the runner's own folders over both: later mounts win.
    assert argv.index("/data/cache") > argv.index("/data") and argv.index("/c/runners/w/0/scratch") > argv.index("/data/cache")


def test_the_layout_hides_the_cache_and_keys_and_refuses_a_shared_dir_inside_them(tmp_path):
    share, keys = tmp_path / "share", tmp_path / "share" / "keys"
    (share / "cache").mkdir(parents=True)
    keys.mkdir()
    (keys / "w.key_secret").write_text("secret")
    lay = layout([share], [share / "cache", keys / "w.key_secret", tmp_path / "elsewhere"])
    assert lay.shared == (str(share),)
    assert set(lay.masks) == {(str(share / "cache"), True), (str(keys / "w.key_secret"), False)}
    assert not any(b == "/" or b.startswith(("/etc/nsd", "/root/.ssh", "/home")) for b in lay.binds)
    with pytest.raises(SandboxError, match="inside"):
        layout([share / "cache" / "models"], [share / "cache"])


def test_a_runner_gets_only_the_environment_it_is_given(monkeypatch, tmp_path):
    monkeypatch.setenv("NSD_TEST_SECRET_TOKEN", "hunter2")
    monkeypatch.setenv("OMP_SCHEDULE", "static")
    env = runner_env(2, tmp_path / "scratch", passed=("NSD_TEST_PASSED",))
    assert "NSD_TEST_SECRET_TOKEN" not in env and env["OMP_SCHEDULE"] == "static"
    assert env["HOME"].startswith(str(tmp_path / "scratch")) and env["NUMBA_CACHE_DIR"] == str(tmp_path / "scratch" / "numba")
    monkeypatch.setenv("NSD_TEST_PASSED", "yes")
    assert runner_env(2, passed=("NSD_TEST_PASSED",))["NSD_TEST_PASSED"] == "yes"


def test_what_a_runner_made_is_taken_without_following_its_links(tmp_path):
    scratch, secret = tmp_path / "scratch", tmp_path / "worker_secret"
    secret.write_text("the worker's own")
    (scratch / "artifact" / "model").mkdir(parents=True)
    (scratch / "artifact" / "model" / "weights.pt").write_bytes(b"w")
    (scratch / "artifact" / "model" / "stolen").symlink_to(secret)
    staged = take(scratch, "artifact", tmp_path / "uploads" / "1")
    with pytest.raises(BlobMemberError, match="stolen"):  # packing a runner's output never follows a link
        pack_tree(staged / "model", io.BytesIO(), follow_links=False)
    (scratch / "linked").symlink_to(tmp_path)  # a link where a folder was expected is removed, not followed
    with pytest.raises(BlobMemberError):
        take(scratch, "linked", tmp_path / "uploads" / "2")
    assert not (tmp_path / "uploads" / "2").exists() and secret.read_text() == "the worker's own"
    with pytest.raises(BlobMemberError):
        link_tree(staged / "model", tmp_path / "view")
    (staged / "model" / "stolen").unlink()
    out = io.BytesIO()
    pack_tree(staged / "model", out, follow_links=False)
    names = tarfile.open(fileobj=io.BytesIO(out.getvalue())).getnames()
    assert names == ["model", "model/weights.pt"]


def test_a_job_names_its_files_only_through_the_runners_own_folders(tmp_path):
    blobs = tmp_path / "blobs"
    (blobs / ("a" * 64) / "tree" / "model").mkdir(parents=True)
    (blobs / ("a" * 64) / "tree" / "model" / "w.bin").write_bytes(b"weights")
    dirs = RunnerDirs(tmp_path / "runners" / "w" / "0")
    dirs.fresh()
    log = tmp_path / "logs" / "t" / "0-a1.log"
    log.parent.mkdir(parents=True)
    log.touch()
    spec = {"model": {"path": str(blobs / ("a" * 64) / "tree" / "model"), "shared": False},
            "recipe": {"kind": "python", "file": "", "data": ""}}
    job = expose({"spec": spec, "log": str(log)}, blobs, dirs)
    seen = Path(job["spec"]["model"]["path"])
    assert seen == dirs.files / ("a" * 64) / "model" and (seen / "w.bin").read_bytes() == b"weights"
    assert os.stat(seen / "w.bin").st_ino == os.stat(blobs / ("a" * 64) / "tree" / "model" / "w.bin").st_ino
    assert job["log"] == str(dirs.scratch / "job.log") and os.path.samefile(job["log"], log)
    dirs.clear_files()
    assert list(dirs.files.iterdir()) == [] and (blobs / ("a" * 64) / "tree" / "model" / "w.bin").exists()


def test_a_runners_answer_is_checked_like_a_peers():
    assert checks.runner_answer(["not", "a", "map"])["ok"] is False
    answer = checks.runner_answer({"ok": True, "metric": 0.9, "requeue": True, "handback": True, "artifact": "x",
                                   "evil": 1, "kept": 7})
    assert answer["ok"] is True and answer["metric"] == 0.9
    assert not {"requeue", "handback", "artifact", "evil", "kept"} & set(answer)  # only the worker sets those
    assert "evil" in answer["error"] and "requeue" in answer["error"]
    assert checks.runner_answer({"metric": 1.0})["ok"] is False
    lease = {"trial_id": "0123456789ab/3", "attempt": 1, "worker_id": "w"}
    assert checks.result({**lease, "ok": True, "metric": 0.5}) == {**lease, "ok": True, "metric": 0.5}
    huge = checks.result({**lease, "ok": True, "log": "x" * 200_000, "error": "y" * 200_000,
                          "configs": [{"config": {"rtn": {"bits": 4}}, "label": "z" * 400}] * 30_000})
    assert huge["ok"] is False and "size" in huge["error"] and len(msgpack.packb(huge)) < MAX_BODY[Cmd.RESULT]


def test_shared_task_paths_must_lie_in_the_workers_shared_dirs():
    assert checks.shared_paths({"model.path": "/data/m/x.pt"}, ["/data/m"]) is None
    why = checks.shared_paths({"model.path": "/data/mx/x.pt"}, ["/data/m"])
    assert "model.path /data/mx/x.pt is not in a folder this worker shares" in why
    assert "--shared-dir" in checks.shared_paths({"recipe.file": "/r.py"}, [])


def test_a_worker_refuses_to_start_without_a_working_sandbox_unless_told_it_is_for_development(
        tmp_path, monkeypatch, caplog):
    env = {**os.environ, "PATH": str(tmp_path)}  # a machine without bwrap
    proc = subprocess.run([sys.executable, "-m", "nsd", "worker", "--cores", "1", "--cache-dir", str(tmp_path / "w")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "bubblewrap is not installed" in proc.stderr and "--no-sandbox" in proc.stderr
    monkeypatch.setenv("PATH", str(tmp_path))
    with caplog.at_level("WARNING"):
        daemon = WorkerDaemon(WorkerConfig(cache_dir=tmp_path / "w", cpus=[0], sandbox=False))
    daemon.ctx.term()
    assert daemon.pool.setup.layout is None and "RUNNERS ARE NOT SANDBOXED" in caplog.text
    caplog.clear()
    assert sandbox_works(tmp_path) is False  # `nsd run`: one line, and it goes on without
    assert len(caplog.records) == 1 and "without a sandbox" in caplog.text


# ------------------------------------------------------------- real workers, runners and bwrap (slow)

slow = pytest.mark.slow

# What the hostile recipe tries, at import, in its runner. TARGETS (the test fills it in) is what it looks
# for: every path in the worker's cache dir (other tasks' blobs, logs, the outbox, other runners' folders),
# the worker's CURVE key, the broker's ports and the worker's pid. It prints what it managed, then behaves
# as the digits recipe (so that its own task still ends).
HOSTILE = r'''
import ctypes, json, os, signal, socket
TARGETS = json.loads(__TARGETS__)
own = os.path.dirname(os.getcwd())  # its runner's own folder (scratch and files)
did = {"read": [], "listed": [], "wrote": [], "connected": [], "signalled": [], "traced": [], "environ": [],
       "visible_pids": [], "secret_in_env": "NSD_TEST_SECRET_TOKEN" in os.environ}
control = {"model": os.path.getsize(os.environ["NSD_MODEL_PATH"]) > 0, "shared": None, "scratch": False}
for path in TARGETS["files"]:
    if path.startswith(own + "/"):
        continue  # its own scratch (a fresh runner's copy of the compiled packers)
    try:
        with open(path, "rb") as f:
            if f.read(1):  # a hidden file reads as empty
                did["read"].append(path)
    except OSError:
        pass
for path in TARGETS["dirs"]:
    if path == own or path.startswith(own + "/"):
        continue
    toward_own = {own[len(path) + 1:].split("/")[0]} if own.startswith(path + "/") else set()
    try:
        if set(os.listdir(path)) - toward_own:  # more than the way to its own folders
            did["listed"].append(path)
    except OSError:
        pass
model = os.environ["NSD_MODEL_PATH"]
for attempt, act in (("append", lambda: open(model, "ab").write(b"x")), ("chmod", lambda: os.chmod(model, 0o666)),
                     ("create", lambda: open(os.path.join(os.path.dirname(model), "planted"), "wb").close()),
                     ("unlink", lambda: os.unlink(model)), ("cache", lambda: open(TARGETS["blob_dir"] + "/x", "wb").close())):
    try:
        act()
        did["wrote"].append(attempt)
    except OSError:
        pass
for port in TARGETS["ports"]:
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", port))
        did["connected"].append(port)
    except OSError:
        pass
    finally:
        s.close()
try:
    socket.create_connection(("1.1.1.1", 53), timeout=2).close()
    did["connected"].append("1.1.1.1:53")
except OSError:
    pass
try:
    os.kill(TARGETS["worker_pid"], 0)
    did["signalled"].append(TARGETS["worker_pid"])
except OSError:
    pass
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
if libc.ptrace(0x4206, TARGETS["worker_pid"], None, None) == 0:  # PTRACE_SEIZE: attaches without stopping it
    did["traced"].append(TARGETS["worker_pid"])
    libc.ptrace(17, TARGETS["worker_pid"], None, None)  # PTRACE_DETACH
for pid in filter(str.isdigit, os.listdir("/proc")):
    did["visible_pids"].append(int(pid))
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            if b"NSD_TEST_SECRET_TOKEN" in f.read():
                did["environ"].append(int(pid))
    except OSError:
        pass
try:
    control["shared"] = open(TARGETS["shared_file"]).read()
except OSError:
    pass
with open("scratch-probe", "w") as f:
    control["scratch"] = f.write("mine") == 4
print("HOSTILE-REPORT " + json.dumps({"did": did, "control": control}), flush=True)
'''


def tree(root: Path) -> tuple[list[str], list[str], dict[str, str]]:
    """Every file and folder under root, and each file's sha256."""
    files, dirs, hashes = [], [], {}
    for here, subdirs, names in os.walk(root):
        dirs += [os.path.join(here, d) for d in subdirs]
        for name in names:
            path = os.path.join(here, name)
            files.append(path)
            with open(path, "rb") as f:
                hashes[path] = hashlib.sha256(f.read()).hexdigest()
    return files, dirs, hashes


@pytest.fixture
async def curve_cluster(tmp_path, monkeypatch):
    """A CURVE broker, and a worker (2 slots) whose cache and key pair lie inside a folder it shares with
    its runners (so that only the sandbox's masks hide them); a secret in the worker's environment."""
    monkeypatch.setenv("NSD_TEST_SECRET_TOKEN", "hunter2")
    share = tmp_path / "share"
    share.mkdir()
    (share / "public.txt").write_text("shared with runners")
    made = {name: generate_keypair(tmp_path / "keys", name) for name in ("broker", "alice")}
    made["node1"] = generate_keypair(share / "keys", "node1")
    allow(tmp_path / "allow", "client", made["alice"][0], code=True)  # its tasks run python recipes
    allow(tmp_path / "allow", "worker", made["node1"][0])
    broker = Broker(BrokerConfig(state_dir=tmp_path / "state", clients="tcp://127.0.0.1:*", workers="tcp://127.0.0.1:*",
                                 events="tcp://127.0.0.1:*", curve_secret=made["broker"][1], keys_dir=tmp_path / "allow",
                                 heartbeat_s=0.5))
    await broker.start()
    cpus = sorted(os.sched_getaffinity(0))[:2]
    worker = WorkerDaemon(WorkerConfig(broker=broker.endpoints["workers"], cpus=cpus, cache_dir=share / "cache",
                                       worker_id="victim", heartbeat_s=0.5, curve_key=made["node1"][1],
                                       server_key=made["broker"][0], shared_dirs=[share]))
    running = asyncio.create_task(worker.run())
    client = AsyncClient(broker.endpoints["clients"], timeout_s=10, idle_resnapshot_s=0.5,
                         curve_key=made["alice"][1], server_key=made["broker"][0])
    try:
        await asyncio.wait_for(worker.registered.wait(), 60)
        yield broker, worker, client, share, made
    finally:
        await client.close()
        worker.stop(grace_s=0)
        await asyncio.wait_for(running, 60)
        await broker.stop()


@slow
async def test_a_hostile_recipe_reaches_nothing_and_the_worker_and_other_tasks_go_on(curve_cluster, tmp_path):
    broker, worker, client, share, made = curve_cluster
    first = await client.result(await client.submit(digits_spec()), wait=True)  # another task's blobs, logs, outbox
    assert first["state"] == "done"
    files, dirs, before = tree(worker.cache_dir)
    files.append(str(made["node1"][1]))  # the worker's CURVE secret (inside the shared dir: masked)
    assert any("/blobs/" in f for f in files) and any(f.endswith(".json") and "outbox" in f for f in files)
    assert any("/runners/" in d for d in dirs)  # the other runner's folders
    ports = [int(ep.rsplit(":", 1)[1]) for ep in broker.endpoints.values()]
    targets = {"files": files, "dirs": dirs + [str(worker.cache_dir)], "ports": ports, "worker_pid": os.getpid(),
               "blob_dir": str(worker.blobs.root), "shared_file": str(share / "public.txt")}
    recipe = tmp_path / "hostile.py"
    recipe.write_text(HOSTILE.replace("__TARGETS__", repr(json.dumps(targets))) + (DIGITS / "recipe.py").read_text())
    spec = digits_spec(config_set=[{"rtn": {"bits": [3, 8], "use_layer_wise": False}}])
    spec["recipe"]["file"] = str(recipe)
    hostile = await client.result(await client.submit(spec), wait=True)
    (log,) = await client.logs(hostile["task_id"], "baseline")  # the first job that loads the recipe
    report = json.loads(log["text"].split("HOSTILE-REPORT ", 1)[1].splitlines()[0])
    # It ran, and could do what a recipe must: read its own model and the shared dir, write its scratch...
    assert report["control"] == {"model": True, "shared": "shared with runners", "scratch": True}
    # ...and none of the rest: no other task's blob, no other runner's folder, no key, no outbox, no log of
    # another task, no write to the cache, no connection, no other process, no secret of the worker's.
    did = report["did"]
    assert did["read"] == [] and did["listed"] == [] and did["wrote"] == [] and did["connected"] == []
    assert did["signalled"] == [] and did["traced"] == [] and did["environ"] == [] and not did["secret_in_env"]
    assert len(did["visible_pids"]) <= 3  # its sandbox's init, itself (and a child it may have)
    assert hostile["state"] == "done" and hostile["baseline"] == first["baseline"]
    # The worker and every other task go on: its cache is as it was, the next task gets the same answer.
    _, _, after = tree(worker.cache_dir)
    assert {f: h for f, h in after.items() if f in before and "/blobs/" in f} == \
        {f: h for f, h in before.items() if "/blobs/" in f}
    again = await client.result(await client.submit(digits_spec()), wait=True)
    assert (again["winner"], again["baseline"]) == (first["winner"], first["baseline"])
    assert (await client.cluster())[0]["worker_id"] == "victim" and worker.registered.is_set()


# A recipe that replaces its runner's metric function for whatever runs there next, then fails its own task
# (issue 15's third attack).
TAMPER = '''
import sys
for name in ("__main__", "nsd.worker.runner"):
    module = sys.modules.get(name)
    if module is not None and hasattr(module, "_metric"):
        module._metric = lambda value: 0.4242
raise RuntimeError("this recipe fails its own task")
'''


@slow
async def test_a_recipe_that_tampers_with_its_runner_cannot_change_the_next_task(client, start_workers, tmp_path):
    (worker,) = await start_workers(1)  # one slot: the next task runs where the tampering recipe ran
    recipe = tmp_path / "tamper.py"
    recipe.write_text(TAMPER)
    spec = digits_spec()
    spec["recipe"]["file"] = str(recipe)
    tampered = await client.result(await client.submit(spec), wait=True)
    assert tampered["state"] == "failed" and "fails its own task" in tampered["error"]
    tampered_runner = worker.slots[0].runner.proc.pid
    honest = await client.result(await client.submit(digits_spec()), wait=True)
    assert honest["state"] == "done" and honest["baseline"] != 0.4242
    assert (honest["winner"]["index"], honest["winner"]["metric"]) == (2, 350 / 360)  # not a 2-bit "winner"
    assert all(t["metric"] != 0.4242 for t in honest["trials"])
    assert worker.slots[0].runner.proc.pid != tampered_runner  # a fresh runner served the next task
