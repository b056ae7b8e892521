#!/usr/bin/python3 -IS
# SPDX-License-Identifier: LGPL-2.1-or-later
"""kmodd-modprobe: the program /proc/sys/kernel/modprobe points at.

The kernel runs it as `HELPER -q -- NAME` (root, fds 0-2 closed, env HOME/TERM/PATH only,
the requesting task blocked until we exit).  It asks the kmodd daemon, then execs the real
modprobe (allow) or exits 1 (deny).  If the daemon does not answer it decides from the last
snapshot the daemon compiled, and if the name is not in there it execs the real modprobe:
the rendered /run/modprobe.d file still blocks denied modules.

Rules for this file (see docs/protocol.md):
- stdlib only, imports nothing from kmodd; everything else imports its constants;
- start-up is the cost: `python3 -IS -c pass` is ~6 ms here, `import socket` adds ~6 ms
  (enum, selectors), `_socket` adds ~0.1 ms; so module level imports only builtins.
"""

# ----------------------------------------------------------------------------------------
# Contract constants (imported by kmodd.daemon, kmodd.policy.compile, kmodd.cli, tests).

RUNTIME_DIR = "/run/kmodd"
RUNTIME_DIR_ENV = "KMODD_RUNTIME_DIR"  # tests only; the kernel never sets it
DECIDE_SOCKET = "decide.sock"  # helper <-> daemon, root peers only (SO_PEERCRED)
CONTROL_SOCKET = "control.sock"  # kmodctl <-> daemon
SNAPSHOT_FILE = "snapshot"
DEFAULT_MODPROBE = "/sbin/modprobe"

# Request names: MODULE_NAME_LEN is 56 on 64-bit kernels, so the kernel never sends more
# than 55 bytes.  We accept printable ASCII without '/' and nothing else.
NAME_MAX = 55
NAME_MIN_BYTE = 0x21  # '!' (space and control characters are refused)
NAME_MAX_BYTE = 0x7E  # '~'

# Decide protocol (stream socket, one request per connection, bounded both ways):
#   helper -> daemon:  b"decide NAME\n"
#   daemon -> helper:  b"allow RULE\n" | b"deny RULE\n" | b"error MESSAGE\n"
DECIDE_PREFIX = b"decide "
DECIDE_MAX = 512  # bytes, either direction
DECIDE_TIMEOUT_S = 0.5  # connect + send + receive, total; then the snapshot decides

# Control protocol (stream socket): JSON objects framed by a NUL byte, varlink-shaped:
#   {"method": "io.kmodd.Status", "parameters": {...}}\0
#   {"parameters": {...}}\0  or  {"error": "io.kmodd.X", "parameters": {...}}\0
FRAME_END = b"\0"
CONTROL_MAX = 1 << 20  # bytes per frame

# Snapshot (written by the daemon atomically, read by the helper with one read() and a
# bytes.find: no parsing of the ~6,000 entries on the hot path):
#   kmodd-snapshot 1\n
#   generation N\n mode enforce|permissive\n modprobe PATH\n hash HEX\n
#   \n
#   KEY VERDICT RULE\n ...      KEY = normalized request name, VERDICT = a|d
#   end\n
SNAPSHOT_MAGIC = b"kmodd-snapshot 1\n"
SNAPSHOT_END = b"\nend\n"
SNAPSHOT_MAX = 16 << 20

EXIT_ALLOW = 0
EXIT_DENY = 1
EXIT_USAGE = 2

SYSLOG_IDENT = "kmodd-modprobe"


def normalize(name: str) -> str:
    """kmod's alias_normalize: '-' becomes '_' except inside [...] character classes."""
    if "[" not in name:
        return name.replace("-", "_")
    out = []
    depth = 0
    for ch in name:
        if ch == "[":
            depth = 1
        elif ch == "]":
            depth = 0
        elif ch == "-" and not depth:
            ch = "_"
        out.append(ch)
    return "".join(out)


def valid_name(name: bytes) -> bool:
    """True if NAME may be passed on: bounded, printable ASCII, no '/'."""
    if not 0 < len(name) <= NAME_MAX:
        return False
    return all(NAME_MIN_BYTE <= b <= NAME_MAX_BYTE and b != 0x2F for b in name)
