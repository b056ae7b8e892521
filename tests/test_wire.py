"""The control protocol codec (kmodd.wire)."""

from __future__ import annotations

import pytest

from kmodd import helper, wire


def test_call_round_trip() -> None:
    frame = wire.encode_call(wire.Method.EXPLAIN, {"name": "net-pf-5"})
    assert frame.endswith(b"\0") and frame.count(b"\0") == 1
    call = wire.decode_call(frame[:-1])
    assert call == wire.Call(wire.Method.EXPLAIN, {"name": "net-pf-5"})


def test_reply_and_error_round_trip() -> None:
    assert wire.decode_reply(wire.encode_reply({"a": [1, None]})[:-1]) == {"a": [1, None]}
    frame = wire.encode_error(wire.ErrorName.RELOAD_FAILED, "2 errors", errors=["x:1:2: y"])
    with pytest.raises(wire.RemoteError) as err:
        wire.decode_reply(frame[:-1])
    assert err.value.name == "io.kmodd.ReloadFailed"
    assert err.value.parameters["errors"] == ["x:1:2: y"]
    assert str(err.value) == "2 errors"


def test_nul_inside_a_value_never_splits_a_frame() -> None:
    frame = wire.encode_reply({"s": "a\0b"})
    assert frame.count(b"\0") == 1
    assert wire.decode_reply(frame[:-1]) == {"s": "a\0b"}


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"nope",
        b"[]",
        b"1",
        b'{"method": 5}',
        b'{"method": "io.kmodd.Nope"}',
        b'{"method": "io.kmodd.Status", "parameters": []}',
        b"\xff\xfe",
        b'{"method": NaN}',
    ],
)
def test_malformed_calls_are_protocol_errors(frame: bytes) -> None:
    with pytest.raises(wire.ProtocolError):
        wire.decode_call(frame)


def test_framer_splits_and_bounds() -> None:
    framer = wire.Framer(limit=16)
    assert framer.feed(b"ab\0cd") == [b"ab"]
    assert framer.feed(b"e\0\0") == [b"cde", b""]
    assert framer.pending == 0
    with pytest.raises(wire.ProtocolError):
        framer.feed(b"x" * 17)


def test_oversized_frames_are_refused_when_encoding() -> None:
    with pytest.raises(wire.ProtocolError):
        wire.encode_reply({"x": "a" * helper.CONTROL_MAX})


def test_nan_is_not_json() -> None:
    with pytest.raises(ValueError):
        wire.encode_reply({"x": float("nan")})
