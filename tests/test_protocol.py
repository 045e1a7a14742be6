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
])
def test_malformed_messages_are_refused_with_a_reason(frames, reason):
    with pytest.raises(ProtocolError, match=reason):
        unpack(frames, CLIENT_TO_BROKER)
