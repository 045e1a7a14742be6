"""Replication at the Store's transaction level (nsd.broker.replication), without sockets: what the active
broker commits, the passive one holds row for row — any table, with no code per table."""

from __future__ import annotations

import sqlite3
import time

import pytest

from nsd.broker import replication
from nsd.broker.replication import Applier, Capture, ReplayLog, ReplicationError
from nsd.broker.store import Store
from nsd.protocol import Cmd, PEER_TO_PEER, ProtocolError, pack, unpack


def dump(db: sqlite3.Connection) -> dict:
    """Every replicated table's rows with their rowids."""
    return {t: [tuple(r) for r in db.execute(f'SELECT rowid, * FROM "{t}" ORDER BY rowid')]
            for t in replication.replicated_tables(db)}


def pair_of_stores(tmp_path, extra_sql: str = ""):
    """An active store with capture on and a passive one started from its snapshot; records land in a list."""
    active = Store(tmp_path / "a.sqlite3")
    if extra_sql:  # another part of the broker adding a table of its own
        active.db.executescript(extra_sql)
    replication.ensure_pair_table(active.db, copy_ok=True)
    records: list = []
    active.capture = Capture(active.db, records.append)
    active.capture.install()
    replication.snapshot(active.db, tmp_path / "snap.sqlite3")
    replication.replace_database(tmp_path / "b.sqlite3", tmp_path / "snap.sqlite3")
    passive = Store(tmp_path / "b.sqlite3")
    return active, passive, records


def ship(records: list, applier: Applier) -> None:
    """Each record over the wire format (packed, checked by the protocol) and applied."""
    for record in records:
        parts = [unpack(pack(Cmd.PEER_TX, body), PEER_TO_PEER).body for body in record.parts()]
        for body in parts:
            applier.check(body)
        applier.apply(record.epoch, record.lsn, parts)
    records.clear()


def test_every_committed_write_reaches_the_copy_row_for_row(tmp_path):
    active, passive, records = pair_of_stores(
        tmp_path, "CREATE TABLE later_lane (id INTEGER PRIMARY KEY, who TEXT NOT NULL, what TEXT, data BLOB);")
    applier = Applier(passive.db)
    with active.tx():
        active.insert_task("0123456789ab", "t", {"a": 1}, "queued", 1.0, "alice")
        active.insert_trials("0123456789ab", [(i, {"rtn": {"bits": i}}, f"b{i}", "pending", "config", [], None)
                                              for i in range(3)])
        active.db.execute("INSERT INTO later_lane (who, what, data) VALUES ('alice', 'submit', x'00ff')")
    with active.tx():
        active.update_trial("0123456789ab", 1, state="running", attempt=2, worker="w1")
        for seq in range(1, 205):
            active.set_seq("0123456789ab", seq)
            active.put_log("0123456789ab", str(seq), 1, "w1", f"log {seq}")
        active.db.execute("DELETE FROM logs WHERE job != 'plan' AND attempt = 1 AND rowid % 3 = 0")  # rows gone too
        active.put_log("0123456789ab", "plan", 1, "w1", "first")
        active.put_log("0123456789ab", "plan", 1, "w1", "replaced")  # INSERT OR REPLACE: a new rowid
        active.cache_put("k" * 64, {"metric": 0.5}, 2.0)
        active.bind_worker_key("w1", "KEY")
    with pytest.raises(RuntimeError):
        with active.tx():  # rolled back: nothing of it is replicated
            active.update_task("0123456789ab", state="failed")
            raise RuntimeError("a handler failed")
    with active.tx():
        with pytest.raises(RuntimeError):
            with active.tx():  # a savepoint rolled back inside a committed transaction
                active.db.execute("DELETE FROM later_lane")
                raise RuntimeError("one message failed")
        active.update_task("0123456789ab", state="planning")
    assert [r.lsn for r in records] == [1, 2, 3]
    ship(records, applier)
    assert dump(passive.db) == dump(active.db)
    assert dump(passive.db)["later_lane"] == [(1, 1, "alice", "submit", b"\x00\xff")]
    assert passive.task("0123456789ab")["state"] == "planning"
    assert replication.read_pair(passive.db).lsn == replication.read_pair(active.db).lsn == 3
    active.close(), passive.close()


def test_a_large_transaction_travels_in_parts(tmp_path):
    active, passive, records = pair_of_stores(tmp_path)
    with active.tx():
        active.insert_task("0123456789ab", "t", {"a": 1}, "queued", 1.0)
        for job in range(12):
            active.put_log("0123456789ab", str(job), 1, "w1", "x" * 600_000)
    (record,) = records
    assert len(record.parts()) > 1 and record.parts()[-1]["last"]
    ship(records, Applier(passive.db))
    assert dump(passive.db) == dump(active.db)
    active.close(), passive.close()


def test_nothing_is_captured_without_a_pair(tmp_path):
    store = Store(tmp_path / "s.sqlite3")
    with store.tx():
        store.insert_task("0123456789ab", "t", {}, "queued", 1.0)
    names = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master UNION SELECT name FROM sqlite_temp_master")}
    assert replication.PAIR_TABLE not in names and not any(n.startswith("nsd_") for n in names)
    store.close()


@pytest.mark.parametrize("body, why", [
    ({"tables": {"tasks": ["id", "name"]}, "rows": [["tasks", 1, ["x", "y"]]]}, "not this broker's"),
    ({"tables": {"secrets": ["a"]}, "rows": [["secrets", 1, ["x"]]]}, "not this broker's"),
    ({"tables": {}, "rows": [["tasks", 1, None]]}, "does not describe"),
])
def test_a_record_that_does_not_fit_this_schema_is_refused(tmp_path, body, why):
    active, passive, _ = pair_of_stores(tmp_path)
    applier = Applier(passive.db)
    before = dump(passive.db)
    with pytest.raises(ReplicationError, match=why):
        applier.check({"epoch": 0, "lsn": 1, "part": 0, "last": True, **body})
    assert dump(passive.db) == before
    active.close(), passive.close()


def test_a_row_of_the_wrong_width_or_kind_is_refused(tmp_path):
    active, passive, _ = pair_of_stores(tmp_path)
    applier = Applier(passive.db)
    cols = applier.tables["cache"]
    with pytest.raises(ReplicationError, match="values"):
        applier.check({"tables": {"cache": cols}, "rows": [["cache", 1, ["k"]]]})
    for rows in ([["cache", 1, [{"a": 1}, "b", 1.0]]], [["Cache; DROP TABLE tasks", 1, None]],
                 [["cache", "1", None]], [["cache", 1, [1] * 300]]):
        with pytest.raises(ProtocolError):
            unpack(pack(Cmd.PEER_TX, {"epoch": 0, "lsn": 1, "part": 0, "last": True, "tables": {"cache": cols},
                                      "rows": rows}), PEER_TO_PEER)
    active.close(), passive.close()


def test_the_replay_log_continues_a_history_or_says_it_cannot():
    log = ReplayLog(epoch=1, lsn=10, max_bytes=300)
    for lsn in range(11, 16):
        log.add(replication.Record(1, lsn, {}, [], size=100))
    assert log.base == (1, 12)  # the oldest fell out past the bound
    assert [r.lsn for r in log.after(1, 13)] == [14, 15]
    assert [r.lsn for r in log.after(1, 12)] == [13, 14, 15]
    assert log.after(1, 11) is None  # too old: a snapshot
    assert log.after(2, 14) is None  # another history (a deposed active's tail): a snapshot


class RefusingLink:
    """The part of a Pair the Stream uses, with a link that refuses sends until it is connected."""

    def __init__(self, log: ReplayLog, lsn: int):
        self.log, self.lsn, self.heartbeat_s, self.connected, self.sent = log, lsn, 0.25, False, []

    def send(self, cmd, body) -> bool:
        if self.connected:
            self.sent.append((cmd, body.get("lsn")))
        return self.connected


def test_records_a_refused_send_held_back_go_out_on_a_later_tick():
    """A passive returns at lsn 3 while the serving broker is at 8, and the link's outgoing half is still
    connecting: the first sends are refused. The next tick sends 4..8 (once this waited forever)."""
    from nsd.broker.pair import PairState, Role, Side
    from nsd.broker.peer_sync import Stream

    log = ReplayLog(epoch=1, lsn=3)
    for lsn in range(4, 9):
        log.add(replication.Record(1, lsn, {}, [], size=10))
    link = RefusingLink(log, lsn=8)
    stream = Stream(link)
    stream.peer_state(Side(Role.BACKUP, PairState.PASSIVE, 1, 3, False, 0, True), resync=False)
    assert stream.streaming and link.sent == []
    link.connected = True
    stream.tick(time.time())
    assert [lsn for cmd, lsn in link.sent if cmd is Cmd.PEER_TX] == [4, 5, 6, 7, 8]
