"""A blocking client for the daemon's control socket (kmodd.wire framing)."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from kmodd import wire
from kmodd.errors import KmoddError

CALL_TIMEOUT_S = 10.0
# A reload builds a generation (~1 s natively, minutes under emulation): the daemon bounds
# the call itself (twice its slowest build + 30 s, at least 120 s: Core.call_timeout), so
# this only catches a daemon that stopped answering; --start-cap's 1200 s, and a minute.
RELOAD_TIMEOUT_S = 1260.0


class DaemonNotRunningError(KmoddError):
    """Nothing listens on the control socket."""


class PermissionDeniedError(KmoddError):
    """The daemon (or the socket's file mode) refused us."""


def _connect(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise DaemonNotRunningError(
            f"kmodd is not running (no listener on {path})",
            hint="start it with `systemctl start kmodd`; offline verbs (validate, explain) "
            "work without it",
        ) from None
    except PermissionError:
        sock.close()
        raise PermissionDeniedError(
            f"permission denied on {path}",
            hint="run as root, or as a member of the daemon's --status-group",
        ) from None
    return sock


def call(
    path: Path,
    method: wire.Method,
    parameters: dict[str, Any] | None = None,
    *,
    timeout: float = CALL_TIMEOUT_S,
) -> dict[str, Any]:
    """One call; the reply's parameters.  Raises DaemonNotRunningError, wire.RemoteError,
    wire.ProtocolError or KmoddError (timeout, connection lost)."""
    deadline = time.monotonic() + timeout
    with _connect(path, timeout) as sock:
        try:
            sock.sendall(wire.encode_call(method, parameters))
            framer = wire.Framer()
            while True:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                data = sock.recv(65536)
                if not data:
                    raise KmoddError(
                        f"kmodd closed the connection on {path}",
                        hint="a non-root caller is refused unless in the status group",
                    )
                frames = framer.feed(data)
                if frames:
                    return wire.decode_reply(frames[0])
        except TimeoutError:
            raise KmoddError(f"kmodd did not answer {method} within {timeout:.0f} s") from None
        except (ConnectionResetError, BrokenPipeError):
            raise KmoddError(f"kmodd reset the connection on {path}") from None
