"""Erasure and retention (issue 16 item 6), on the real broker with scripted workers: `delete` removes the
task and everything kept about it, tells every worker (also one that was away) to drop its blobs, and
leaves the bytes of other tasks of the same tenant, and of other tenants, alone. The real-worker scan for
the deleted model's bytes is `test_a_deleted_task_leaves_no_byte_of_its_model_on_any_node` (slow)."""

from __future__ import annotations

import os
import sqlite3

import pytest

from nsd.broker import daemon as broker_daemon
from nsd.broker.store import Store
from nsd.protocol import Cmd
from tests.conftest import DIGITS, digits_spec, wait_for
from tests.peers import ScriptedWorker, done, metrics_answer, spec

ANSWERS = {0: 0.5, 1: 0.95, 2: 0.2, 3: 0.99, 4: 0.99, 5: 0.99}


def logged(answer):
    """An answer that also sends a log, as a real worker's results do."""
    return lambda job: {**answer(job), "log": f"the log of {job['kind']} {job.get('index')}"}


def spec_with_model(path) -> dict:
    return {**spec(), "model": {"path": str(path)}}


def rows(state_dir, table: str, task_id: str) -> int:
    column = "id" if table == "tasks" else "task_id"
    with sqlite3.connect(state_dir / "nsd.sqlite3") as db:
        return db.execute(f"SELECT COUNT(*) FROM {table} WHERE {column} = ?", (task_id,)).fetchone()[0]


def blob_of(ref: str) -> str:
    return ref.split(":")[1].split("/")[0]


async def test_delete_removes_the_task_its_blobs_and_what_workers_cached(tenants, tmp_path):
    broker = tenants.broker
    alice, bob = tenants.client("alice"), tenants.client("bob")
    worker = await ScriptedWorker(broker.endpoints["workers"], "node1", slots=2, curve=tenants.keys("node1"),
                                  answer=logged(metrics_answer(ANSWERS))).start()
    try:
        shared_model, own_model = tmp_path / "shared.bin", tmp_path / "own.bin"
        shared_model.write_bytes(os.urandom(2048))
        own_model.write_bytes(os.urandom(2048))
        doomed = await alice.submit(spec_with_model(own_model))
        kept = await alice.submit(spec_with_model(shared_model))  # another task of hers names this one
        other = await bob.submit(spec_with_model(own_model))  # and bob holds the same bytes as the doomed one
        for client, task_id in ((alice, doomed), (alice, kept), (bob, other)):
            await done(client, task_id)
        task = await alice.result(doomed)
        model, artifact = blob_of(task["spec"]["model"]["path"]), blob_of(task["artifact"])
        recipe = blob_of(task["spec"]["recipe"]["file"])  # named by `kept` too
        assert rows(broker.state_dir, "logs", doomed) > 0 and rows(broker.state_dir, "trials", doomed) == 6

        answer = await alice.delete(doomed[:6])
        assert answer["task_id"] == doomed
        assert f"no task {doomed!r}" in str(await _error(alice.status(doomed)))
        for table in ("tasks", "trials", "logs", "cache"):
            assert rows(broker.state_dir, table, doomed) == 0, table
        # Its model is bob's bytes too, and its artifact the same stand-in bytes as other tasks': they stay
        # on the broker (their other owners hold them), but no longer for alice.
        assert broker.blobs.has(model) and not broker.store.owns(model, "alice")
        assert broker.store.owns(recipe, "alice")  # `kept` still names it
        drop = await wait_for(lambda: _first(worker.drops), 10)
        assert drop["tasks"] == [doomed] and model in drop["sha256"] and recipe not in drop["sha256"]
        # A worker that was away when it happened is told when it registers.
        late = await ScriptedWorker(broker.endpoints["workers"], "evil", curve=tenants.keys("evil")).start()
        await wait_for(lambda: _first(late.drops), 10)
        assert doomed in late.drops[0]["tasks"]
        await late.stop()
        entries = await tenants.client("root").audit(task_id=doomed)
        assert entries[0]["action"] == "delete" and entries[0]["actor"] == "client:alice"
        assert broker.blobs.has(artifact)  # the same bytes are the artifact of bob's task too
    finally:
        await worker.stop()


async def test_a_blob_nobody_else_holds_leaves_the_brokers_disk(tenants, tmp_path):
    alice = tenants.client("alice")
    worker = await ScriptedWorker(tenants.broker.endpoints["workers"], "node1", curve=tenants.keys("node1"),
                                  answer=metrics_answer(ANSWERS)).start()
    try:
        path = tmp_path / "only-mine.bin"
        path.write_bytes(os.urandom(4096))
        task_id = await alice.submit(spec_with_model(path))
        task = await done(alice, task_id)
        model = blob_of(task["spec"]["model"]["path"])
        assert tenants.broker.blobs.has(model)
        await alice.delete(task_id)
        assert not tenants.broker.blobs.has(model) and tenants.broker.store.owners(model) == []
        assert (await alice.request(Cmd.BLOB_HAVE, sha256=[model]))["missing"] == [model]
    finally:
        await worker.stop()


async def test_deleting_a_running_task_cancels_it_first(tenants, tmp_path):
    alice = tenants.client("alice")
    worker = await ScriptedWorker(tenants.broker.endpoints["workers"], "node1", curve=tenants.keys("node1")).start()
    try:
        path = tmp_path / "m.bin"
        path.write_bytes(os.urandom(64))
        task_id = await alice.submit(spec_with_model(path))
        await wait_for(lambda: _first(worker.assigned), 10)
        await alice.delete(task_id)
        await wait_for(lambda: _first(worker.cancelled), 10)
        assert worker.cancelled[0][0] == f"{task_id}/plan" and task_id not in tenants.broker.tasks
    finally:
        await worker.stop()


async def test_retention_deletes_finished_tasks_and_a_tenant_may_keep_its_own(tenants_keys, tmp_path, monkeypatch):
    monkeypatch.setattr(broker_daemon, "RETENTION_EVERY_S", 0.2)
    broker = await tenants_keys.start(retention_days=0.5 / 86400, tenant_retention={"bob": 0})
    alice, bob = tenants_keys.client("alice"), tenants_keys.client("bob")
    worker = await ScriptedWorker(broker.endpoints["workers"], "node1", curve=tenants_keys.keys("node1"),
                                  answer=metrics_answer(ANSWERS)).start()
    try:
        path = tmp_path / "m.bin"
        path.write_bytes(os.urandom(64))
        hers, his = await alice.submit(spec_with_model(path)), await bob.submit(spec_with_model(path))
        await done(alice, hers), await done(bob, his)
        await wait_for(lambda: _gone(broker, hers), 10)
        assert his in broker.tasks  # bob's retention override: kept
        assert any(e["action"] == "retention" and e["actor"] == "broker"
                   for e in await tenants_keys.client("root").audit(task_id=hers))
    finally:
        await worker.stop()


def test_deleted_rows_leave_no_copy_in_the_database_files(tmp_path):
    """secure_delete and the WAL checkpoint: a deleted log's text is in none of the SQLite files."""
    store = Store(tmp_path / "nsd.sqlite3")
    secret = "SECRET-" + os.urandom(16).hex()
    with store.tx():
        store.insert_task("abcdefabcdef", "t", {"name": "t"}, "done", 1.0, "alice")
        store.put_log("abcdefabcdef", "plan", 1, "w", secret * 50)
    store.db.execute("PRAGMA wal_checkpoint(FULL)")  # the text is in the main file now, too
    with store.tx():
        store.delete_task("abcdefabcdef")
    store.checkpoint()
    files = [p for p in tmp_path.iterdir() if p.name.startswith("nsd.sqlite3")]
    assert files and not any(secret.encode() in p.read_bytes() for p in files)
    store.close()


async def _first(items):
    return items[0] if items else None


async def _gone(broker, task_id):
    return task_id not in broker.tasks


async def _error(call):
    try:
        await call
    except Exception as exc:  # the broker's answer, as the client raises it
        return exc
    raise AssertionError("no error")


def _slice(path, length: int = 64) -> bytes:
    data = path.read_bytes()
    return data[len(data) // 2:len(data) // 2 + length]


def _files_holding(roots, needle: bytes) -> list[str]:
    """Every file under the roots whose bytes contain needle (SQLite's main file, WAL and SHM included)."""
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                found.append(str(path))
    return found


@pytest.mark.slow
async def test_a_deleted_task_leaves_no_byte_of_its_model_on_any_node(broker, client, start_workers, tmp_path):
    """Issue 16 "Done means": after `delete`, neither the model's bytes nor its quantized model's are in any
    file of the broker's state dir (blobs, SQLite and its WAL) or of the workers' cache dirs."""
    workers = await start_workers(2)
    task = await client.result(await client.submit(digits_spec()), wait=True)
    assert task["state"] == "done" and task["artifact"], task
    model = await client.fetch(task["task_id"], tmp_path / "fetched")  # outside every scanned folder
    quantized = max((p for p in model.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    needles = {"model": _slice(DIGITS / "model.pt"), "quantized model": _slice(quantized)}
    roots = [broker.state_dir, *(w.cache_dir for w in workers)]
    for what, needle in needles.items():  # the scan finds them before...
        assert _files_holding(roots, needle), f"the {what}'s bytes were never on a node: the scan proves nothing"
    model_sha = blob_of(task["spec"]["model"]["path"])
    await client.delete(task["task_id"])
    await wait_for(lambda: _true(not any(w.blobs.entry(model_sha).exists() for w in workers)), 30)
    for what, needle in needles.items():  # ...and not after
        assert _files_holding(roots, needle) == [], f"the deleted {what}'s bytes are still there"


async def _true(value):
    return value


def test_the_audit_log_is_bounded_and_newest_first(tmp_path, monkeypatch):
    from nsd.broker import store as store_module

    monkeypatch.setattr(store_module, "AUDIT_KEPT", 1500)
    store = Store(tmp_path / "nsd.sqlite3")
    with store.tx():
        for i in range(3000):
            store.audit(float(i), "alice" if i % 2 else "bob", "client:x", "result", f"{i:012x}")
    entries = store.audit_log(limit=1000)
    assert entries[0]["task_id"] == f"{2999:012x}" and len(entries) == 1000
    kept = store.db.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
    assert 1500 <= kept <= 2500  # trimmed every 1,000 entries to the newest AUDIT_KEPT
    assert {e["tenant"] for e in store.audit_log(tenant="alice")} == {"alice"}
    older = store.audit_log(before=entries[-1]["id"], limit=5)
    assert [e["id"] for e in older] == [entries[-1]["id"] - k for k in range(1, 6)]
    store.close()
