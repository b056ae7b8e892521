"""Make the kernel call request_module(), and report what the syscall said.

Stdlib only, runnable as a file (`/usr/bin/python3 -IS tests/vm/trigger.py SPEC...`) so an
unprivileged user started by setpriv can run it, and importable by the guest runner.
Each SPEC is `socket:FAMILY:TYPE[:PROTO]` or `alg:KIND:NAME`; prints one JSON object: the uid and
gid it ran as, and the outcome of each SPEC.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import sys
from pathlib import Path
from typing import Any

AF_AX25 = 3
AF_APPLETALK = 5
AF_X25 = 9
AF_KEY = 15
AF_PPPOX = 24
AF_ALG = 38
PF_KEY_V2 = 2  # the only protocol AF_KEY accepts


def _failed(err: OSError) -> dict[str, Any]:
    code = err.errno or 0
    return {"ok": False, "errno": code, "error": errno.errorcode.get(code, str(code))}


def open_socket(family: int, kind: int, proto: int = 0) -> dict[str, Any]:
    """socket(FAMILY, KIND, PROTO): an unloaded family makes the kernel ask for
    net-pf-FAMILY (before the family checks KIND, PROTO or the caller's privileges)."""
    try:
        socket.socket(family, kind, proto).close()
    except OSError as err:
        return _failed(err)
    return {"ok": True}


def bind_alg(kind: str, name: str) -> dict[str, Any]:
    """socket(AF_ALG) + bind((KIND, NAME)): the bind asks for algif-KIND."""
    try:
        with socket.socket(AF_ALG, socket.SOCK_SEQPACKET) as sock:
            sock.bind((kind, name))
    except OSError as err:
        return _failed(err)
    return {"ok": True}


def open_chardev(major: int, minor: int, path: str) -> dict[str, Any]:
    """open() a character device node MAJOR:MINOR made at PATH: with no driver registered
    for MAJOR, chrdev_open asks for char-major-MAJOR-MINOR (then fails ENXIO)."""
    node = Path(path)
    node.unlink(missing_ok=True)
    os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(major, minor))
    try:
        os.close(os.open(node, os.O_RDONLY | os.O_NONBLOCK))
    except OSError as err:
        return _failed(err)
    finally:
        node.unlink()
    return {"ok": True}


def run_spec(spec: str) -> dict[str, Any]:
    what, _, rest = spec.partition(":")
    first, _, second = rest.partition(":")
    if what == "socket":
        second, _, proto = second.partition(":")
        outcome = open_socket(int(first), int(second), int(proto or 0))
    elif what == "alg":
        outcome = bind_alg(first, second)
    else:
        raise ValueError(f"unknown trigger {spec!r}")
    return {"spec": spec, **outcome}


def main(argv: list[str]) -> int:
    outcomes = [run_spec(spec) for spec in argv[1:]]
    print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "outcomes": outcomes}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
