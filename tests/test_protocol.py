import msgpack
import pytest

from nsd.protocol import CLIENT_TO_BROKER, MAGIC, Cmd, ProtocolError, pack, unpack


def test_round_trip():
    frames = pack(Cmd.SUBMIT, {"req": 7, "spec": {"name": "x"}})
    msg = unpack(frames, CLIENT_TO_BROKER)
    assert msg.cmd is Cmd.SUBMIT and msg.body == {"req": 7, "spec": {"name": "x"}}


@pytest.mark.parametrize("frames, reason", [
    ([b"junk"], "expected 3 frames"),
    ([b"HTTP", b"\x22", b"\x80"], "not an nsd message"),
    ([b"NSD9", b"\x22", b"\x80"], "protocol version"),
    ([MAGIC, b"\x22\x22", b"\x80"], "one byte"),
    ([MAGIC, b"\xee", b"\x80"], "unknown message type"),
    ([MAGIC, bytes([Cmd.READY]), b"\x80"], "not valid on this socket"),
    ([MAGIC, bytes([Cmd.SUBMIT]), b"\xc1"], "not valid msgpack"),
    ([MAGIC, bytes([Cmd.SUBMIT]), msgpack.packb([1, 2])], "must be a map"),
    ([MAGIC, bytes([Cmd.SUBMIT]), msgpack.packb({"req": 1})], "missing field 'spec'"),
    ([MAGIC, bytes([Cmd.SUBMIT]), msgpack.packb({"req": True, "spec": {}})], "wrong type"),
    ([MAGIC, bytes([Cmd.STATUS]), msgpack.packb({"req": 1, "task_id": 5})], "wrong type"),
    ([MAGIC, bytes([Cmd.LIST]), msgpack.packb({1: 2})], "not valid msgpack"),
    # tenants (issue 16): the tenant a request names, paging, the new requests' fields
    ([MAGIC, bytes([Cmd.LIST]), msgpack.packb({"req": 1, "tenant": "../alice"})], "field 'tenant'"),
    ([MAGIC, bytes([Cmd.LIST]), msgpack.packb({"req": 1, "tenant": ""})], "field 'tenant'"),
    ([MAGIC, bytes([Cmd.LIST]), msgpack.packb({"req": 1, "tenant": "a" * 65})], "field 'tenant'"),
    ([MAGIC, bytes([Cmd.LIST]), msgpack.packb({"req": 1, "tenant": ["alice"]})], "field 'tenant'"),
    ([MAGIC, bytes([Cmd.SUBMIT]), msgpack.packb({"req": 1, "spec": {}, "code": "yes"})], "field 'code'"),
    ([MAGIC, bytes([Cmd.STATUS]), msgpack.packb({"req": 1, "task_id": "a", "limit": 10**6})], "field 'limit'"),
    ([MAGIC, bytes([Cmd.STATUS]), msgpack.packb({"req": 1, "task_id": "a", "limit": 0})], "field 'limit'"),
    ([MAGIC, bytes([Cmd.RESULT_GET]), msgpack.packb({"req": 1, "task_id": "a", "offset": -1})], "field 'offset'"),
    ([MAGIC, bytes([Cmd.DELETE_TASK]), msgpack.packb({"req": 1})], "missing field 'task_id'"),
    ([MAGIC, bytes([Cmd.AUDIT]), msgpack.packb({"req": 1, "limit": 10**9})], "field 'limit'"),
    ([MAGIC, bytes([Cmd.AUDIT]), msgpack.packb({"req": 1, "owner": "x y"})], "field 'owner'"),
    ([MAGIC, bytes([Cmd.CACHE_PURGE]), msgpack.packb({"req": 1, "worker": "../w"})], "field 'worker'"),
    ([MAGIC, bytes([Cmd.CACHE_PURGE]), msgpack.packb({"req": 1, "all": 1})], "field 'all'"),
])
def test_malformed_messages_are_refused_with_a_reason(frames, reason):
    with pytest.raises(ProtocolError, match=reason):
        unpack(frames, CLIENT_TO_BROKER)


@pytest.mark.parametrize("body, reason", [
    ({"sha256": ["../../etc"], "tasks": []}, "field 'sha256'"),
    ({"sha256": ["c" * 64] * 1001, "tasks": []}, "field 'sha256'"),
    ({"sha256": [], "tasks": ["../abcdefabcd"]}, "field 'tasks'"),
    ({"sha256": [], "tasks": ["abcdefabcdef/0"]}, "field 'tasks'"),
    ({"sha256": []}, "missing field 'tasks'"),
])
def test_a_drop_a_worker_acts_on_names_only_hashes_and_task_ids(body, reason):
    """DROP (broker -> worker) makes a worker delete folders named after its fields: checked at the door."""
    from nsd.protocol import BROKER_TO_WORKER

    with pytest.raises(ProtocolError, match=reason):
        unpack(pack(Cmd.DROP, body), BROKER_TO_WORKER)
    assert unpack(pack(Cmd.DROP, {"sha256": ["c" * 64], "tasks": ["abcdefabcdef"]}), BROKER_TO_WORKER).body


def test_job_ids_of_every_kind_round_trip_and_nothing_else_parses():
    from nsd.protocol import JOB_KINDS, JobRef, parse_job_id

    task = "0123456789ab"
    for kind in JOB_KINDS.values():
        ref = JobRef(kind.name, 17 if kind.per_trial else None)
        assert parse_job_id(ref.id(task)) == (task, ref)
    assert JobRef("trial", 3).id(task) == f"{task}/3" and JobRef("plan").id(task) == f"{task}/plan"
    for bad in ("plan", f"{task}/01", f"{task}/-1", f"{task}/trial/3", f"{task}/plan/3", f"{task}/nope",
                f"{task}/3/", f"{task}/12345678", f"{task.upper()}/plan", f"{task}/../x"):
        with pytest.raises(ValueError):
            parse_job_id(bad)


def test_every_job_kind_has_its_handlers_in_the_broker():
    from nsd.broker.core import Core
    from nsd.broker.jobs import KINDS
    from nsd.protocol import JOB_KINDS

    assert KINDS.keys() == JOB_KINDS.keys()
    for kind in KINDS.values():
        for method in (kind.assign, kind.result, kind.give_up, kind.cached):
            assert method is None or callable(getattr(Core, method)), (kind.name, method)
        assert kind.give_up is not None or kind.in_trial  # a trial's give-up is its `error` state
