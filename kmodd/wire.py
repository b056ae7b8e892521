"""The control protocol (kmodctl <-> daemon): NUL-framed JSON objects, varlink-shaped.

    call:   {"method": "io.kmodd.Status", "parameters": {...}}\\0
    reply:  {"parameters": {...}}\\0
    error:  {"error": "io.kmodd.PermissionDenied", "parameters": {"message": ...}}\\0

One call per frame, one reply per call, frames at most helper.CONTROL_MAX bytes.  The
helper's decide protocol is a separate line protocol (see helper.py and docs/protocol.md):
it must not pay for `import json`.  Never pickle: the peer is untrusted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kmodd.errors import KmoddError
from kmodd.helper import CONTROL_MAX, FRAME_END

Params = dict[str, Any]


class Method(StrEnum):
    STATUS = "io.kmodd.Status"  # root or the status group
    EXPLAIN = "io.kmodd.Explain"  # root or the status group; decides, logs nothing
    RELOAD = "io.kmodd.Reload"  # root only; answers when the new generation is live
    DECIDE = "io.kmodd.Decide"  # root only; a cli-sourced decision, journaled


class ErrorName(StrEnum):
    INVALID_FRAME = "io.kmodd.InvalidFrame"  # not a JSON object / too big / bad shape
    METHOD_NOT_FOUND = "io.kmodd.MethodNotFound"
    INVALID_PARAMETER = "io.kmodd.InvalidParameter"
    PERMISSION_DENIED = "io.kmodd.PermissionDenied"
    RELOAD_FAILED = "io.kmodd.ReloadFailed"  # parameters: errors (list of str)
    NO_GENERATION = "io.kmodd.NoGeneration"  # no policy generation is loaded yet
    INTERNAL = "io.kmodd.InternalError"


class ProtocolError(KmoddError):
    """The peer sent something that is not a well-formed frame of this protocol."""


class RemoteError(KmoddError):
    """The daemon understood the call and answered with an error."""

    def __init__(self, name: str, parameters: Params) -> None:
        self.name = name
        self.parameters = parameters
        message = str(parameters.get("message") or name)
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Call:
    method: Method
    parameters: Params = field(default_factory=dict)


def _encode(obj: Mapping[str, object]) -> bytes:
    # json escapes control characters, so a NUL never appears inside a frame.
    data = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + FRAME_END
    if len(data) > CONTROL_MAX:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds {CONTROL_MAX}")
    return data


def encode_call(method: Method, parameters: Params | None = None) -> bytes:
    return _encode({"method": str(method), "parameters": parameters or {}})


def encode_reply(parameters: Mapping[str, object]) -> bytes:
    return _encode({"parameters": parameters})


def encode_error(name: ErrorName, message: str, **extra: Any) -> bytes:
    return _encode({"error": str(name), "parameters": {"message": message, **extra}})


def _object(frame: bytes) -> Params:
    try:
        obj = json.loads(frame)
    except (UnicodeDecodeError, ValueError) as err:
        raise ProtocolError(f"frame is not JSON: {err}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("frame is not a JSON object")
    return obj


def _parameters(obj: Params) -> Params:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise ProtocolError("'parameters' is not an object")
    return params


def decode_call(frame: bytes) -> Call:
    """A call from a client; ProtocolError if malformed or the method is unknown."""
    obj = _object(frame)
    method = obj.get("method")
    if not isinstance(method, str):
        raise ProtocolError("'method' missing or not a string")
    try:
        known = Method(method)
    except ValueError:
        raise ProtocolError(f"unknown method {method[:100]!r}") from None
    return Call(known, _parameters(obj))


def decode_reply(frame: bytes) -> Params:
    """The reply's parameters; RemoteError if the daemon answered with an error."""
    obj = _object(frame)
    params = _parameters(obj)
    error = obj.get("error")
    if error is not None:
        raise RemoteError(str(error), params)
    return params


class Framer:
    """Splits a byte stream into frames, bounded by CONTROL_MAX per frame."""

    def __init__(self, limit: int = CONTROL_MAX) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        frames = []
        while (end := self._buf.find(FRAME_END)) >= 0:
            frames.append(bytes(self._buf[:end]))
            del self._buf[: end + 1]
        if len(self._buf) > self._limit:
            raise ProtocolError(f"frame exceeds {self._limit} bytes")
        return frames

    @property
    def pending(self) -> int:
        return len(self._buf)
