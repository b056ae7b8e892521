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
  (enum, selectors), `_socket` adds ~0.1 ms; so module level imports only builtins;
- this script also pays for compiling its own source on every exec (a script never gets a
  .pyc: ~0.14 ms per KB), so keep it small.
"""

import _socket
import os
import sys
import time

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
#   kmodd-snapshot 2\n
#   generation N\n mode enforce|permissive\n modprobe PATH\n hash HEX\n
#   \n
#   KEY VERDICT RULE\n ...      KEY = normalized request name, VERDICT = a|d
#   globs\n
#   PATTERN d RULE\n ...        a name that is no KEY and matches PATTERN is denied
#   end\n
# PATTERN is an fnmatch pattern (kmod's subset: * ? [...] [!...]) on the normalized name,
# only consulted after an exact miss (docs/protocol.md).
SNAPSHOT_MAGIC = b"kmodd-snapshot 2\n"
SNAPSHOT_GLOBS = b"globs\n"
SNAPSHOT_END = b"\nend\n"
SNAPSHOT_MAX = 16 << 20

EXIT_ALLOW = 0
EXIT_DENY = 1
EXIT_USAGE = 2

SYSLOG_IDENT = "kmodd-modprobe"
SYSLOG_SOCKET = "/dev/log"
SYSLOG_FACILITY_DAEMON = 3 << 3  # LOG_DAEMON


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
        out.append("_" if ch == "-" and not depth else ch)
    return "".join(out)


_NAME_BYTES = bytes(b for b in range(NAME_MIN_BYTE, NAME_MAX_BYTE + 1) if b != 0x2F)


def valid_name(name: bytes) -> bool:
    """True if NAME may be passed on: bounded, printable ASCII, no '/'."""
    # translate() deletes every allowed byte in C: anything left over is not allowed.
    return 0 < len(name) <= NAME_MAX and not name.translate(None, _NAME_BYTES)


# ----------------------------------------------------------------------------------------
# The program.  Everything below runs as the kernel's usermode helper: plain functions and
# tuples over builtin modules only (no typing, dataclasses, enum, re, json, socket).

TRACE_ENV = "KMODD_HELPER_TRACE"  # tests only: dump sys.modules to this new file before exit


def _fds_to_devnull() -> None:
    """Fill closed fds 0-2 with /dev/null, so nothing we open (the socket, the snapshot)
    becomes a std stream of the real modprobe we exec."""
    fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    while fd <= 2:
        os.set_inheritable(fd, True)
        fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    os.close(fd)


def _log(priority: int, message: str) -> None:
    """One syslog datagram to /dev/log that never blocks.  Not syslog.syslog(): glibc sends
    on a blocking socket, so with journald stalled (its /dev/log queue holds ~10 datagrams)
    the helper hung there, and the kernel's request_module() with it (measured:
    tests/reliability/test_faults.py).  A log line lost is better than a hung caller."""
    line = f"<{SYSLOG_FACILITY_DAEMON | priority}>{SYSLOG_IDENT}[{os.getpid()}]: {message}"
    flags = _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC | _socket.SOCK_NONBLOCK
    try:
        sock = _socket.socket(_socket.AF_UNIX, flags)
    except OSError:
        return
    try:
        sock.sendto(line.encode("utf-8", "replace"), SYSLOG_SOCKET)
    except OSError:  # no syslog daemon, or it is not reading (EAGAIN)
        pass
    finally:
        sock.close()


def _trace() -> None:
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        os.write(fd, "\n".join(sorted(sys.modules)).encode() + b"\n")
    finally:
        os.close(fd)


def runtime_dir() -> str:
    return os.environ.get(RUNTIME_DIR_ENV) or RUNTIME_DIR


def ask_daemon(sock_path: str, name: bytes, timeout: float = DECIDE_TIMEOUT_S) -> bytes | None:
    """One `decide NAME` round trip; the reply line without its newline, or None if the
    daemon did not answer in `timeout` seconds TOTAL (connect + send + receive)."""
    deadline = time.monotonic() + timeout
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(sock_path)
        sock.sendall(DECIDE_PREFIX + name + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or len(reply) > DECIDE_MAX:
                return None
            sock.settimeout(left)
            chunk = sock.recv(DECIDE_MAX)
            if not chunk:
                return None
            reply += chunk
        return reply[:-1]
    except OSError:  # includes TimeoutError, ConnectionRefusedError, FileNotFoundError
        return None
    finally:
        sock.close()


def read_snapshot(path: str) -> bytes | None:
    """The whole snapshot, or None if it is missing, too big, or not complete (magic and
    trailer both present: a torn or foreign file is never trusted)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = b""
        while len(data) <= SNAPSHOT_MAX:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            data += chunk
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) > SNAPSHOT_MAX or not data.startswith(SNAPSHOT_MAGIC):
        return None
    if not data.endswith(SNAPSHOT_END):
        return None
    return data


def snapshot_header(data: bytes) -> dict[bytes, bytes]:
    """The `key value` lines between the magic and the first blank line."""
    end = data.find(b"\n\n")
    header = {}
    for line in data[len(SNAPSHOT_MAGIC) : end].split(b"\n"):
        key, _, value = line.partition(b" ")
        header[key] = value
    return header


def snapshot_lookup(data: bytes, key: bytes) -> tuple[bytes, bytes] | None:
    """(verdict, rule) for KEY from the entry table, else from the first glob row KEY
    matches, or None when KEY is not covered."""
    start = data.find(b"\n\n") + 1  # the entry table starts after this newline
    if start <= 0:
        return None
    globs = data.find(b"\n" + SNAPSHOT_GLOBS, start - 1)
    end = globs + 1 if globs >= 0 else len(data)
    at = data.find(b"\n" + key + b" ", start - 1, end)
    if at < 0:
        return _glob_lookup(data, globs + 1 + len(SNAPSHOT_GLOBS), key) if globs >= 0 else None
    line = data[at + 1 : data.find(b"\n", at + 1)]
    parts = line.split(b" ")
    if len(parts) != 3 or parts[1] not in (b"a", b"d"):
        return None
    return parts[1], parts[2]


def _glob_lookup(data: bytes, start: int, key: bytes) -> tuple[bytes, bytes] | None:
    # The literal prefix test (C) rejects almost every row before glob_match (Python).
    for line in data[start : len(data) - len(SNAPSHOT_END) + 1].split(b"\n"):
        pattern, _, rest = line.partition(b" ")
        cut = min((i for i in map(pattern.find, (b"*", b"?", b"[")) if i >= 0), default=-1)
        if cut < 0:
            if pattern != key:
                continue
        elif not key.startswith(pattern[:cut]) or not glob_match(pattern, key):
            continue
        verdict, _, rule = rest.partition(b" ")
        if verdict == b"d" and rule:
            return verdict, rule
    return None


def glob_match(pattern: bytes, name: bytes) -> bool:
    """fnmatch(pattern, name, 0) for kmod's subset: '*' (any run, '/' and '.' too), '?',
    '[...]' with ranges and '!'/'^' negation; a '[' without ']' is a literal."""
    p = n = 0
    star_p = star_n = -1
    while n < len(name):
        if p < len(pattern):
            c = pattern[p]
            if c == 0x2A:  # '*': remember where to resume, try the empty run first
                star_p, star_n = p, n
                p += 1
                continue
            if c == 0x3F:  # '?'
                p += 1
                n += 1
                continue
            if c == 0x5B:  # '['
                end, hit = _bracket(pattern, p, name[n])
                if end > 0:
                    if hit:
                        p, n = end, n + 1
                        continue
                elif name[n] == c:  # unterminated: a literal '['
                    p, n = p + 1, n + 1
                    continue
            elif name[n] == c:
                p, n = p + 1, n + 1
                continue
        if star_p < 0:
            return False
        star_n += 1  # let the last '*' swallow one more byte
        p, n = star_p + 1, star_n
    while p < len(pattern) and pattern[p] == 0x2A:
        p += 1
    return p == len(pattern)


def _bracket(pattern: bytes, p: int, ch: int) -> tuple[int, bool]:
    """(index after the class, whether CH is in it); (0, False) for no closing ']'."""
    i = p + 1
    negate = i < len(pattern) and pattern[i] in (0x21, 0x5E)  # '!' or '^'
    i += negate
    hit = False
    first = True
    while i < len(pattern) and (first or pattern[i] != 0x5D):
        lo = pattern[i]
        if i + 2 < len(pattern) and pattern[i + 1] == 0x2D and pattern[i + 2] != 0x5D:
            hit = hit or lo <= ch <= pattern[i + 2]
            i += 3
        else:
            hit = hit or lo == ch
            i += 1
        first = False
    if i >= len(pattern):
        return 0, False
    return i + 1, hit != negate


def read_modprobe_path(snapshot_path: str) -> str:
    """The real modprobe named in the snapshot header (its first 4 KiB), else the default."""
    try:
        fd = os.open(snapshot_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return DEFAULT_MODPROBE
    try:
        head = os.read(fd, 4096)
    except OSError:
        return DEFAULT_MODPROBE
    finally:
        os.close(fd)
    if not head.startswith(SNAPSHOT_MAGIC):
        return DEFAULT_MODPROBE
    return _modprobe_from(snapshot_header(head))


def _modprobe_from(header: dict[bytes, bytes]) -> str:
    path = header.get(b"modprobe", b"")
    if not path.startswith(b"/") or b"\n" in path:
        return DEFAULT_MODPROBE
    return os.fsdecode(path)


def _exec_modprobe(modprobe: str, name: str) -> int:
    _trace()
    try:
        os.execv(modprobe, [modprobe, "-q", "--", name])  # noqa: S606 -- no shell, on purpose
    except OSError as err:
        _log(3, f"cannot exec {modprobe} for {name}: {err.strerror}")
    return EXIT_DENY


def _deny(name: str) -> int:
    _trace()
    return EXIT_DENY


def _from_snapshot(snapshot_path: str, name: str, why: str) -> int:
    """The daemon did not answer: decide from the last compiled snapshot."""
    data = read_snapshot(snapshot_path)
    if data is None:
        _log(4, f"fallback for {name}: {why}; no valid snapshot, running modprobe")
        return _exec_modprobe(DEFAULT_MODPROBE, name)
    header = snapshot_header(data)
    modprobe = _modprobe_from(header)
    found = snapshot_lookup(data, normalize(name).encode())
    if found is None:
        _log(4, f"fallback for {name}: {why}; not in snapshot, running modprobe")
        return _exec_modprobe(modprobe, name)
    verdict, rule = found
    rule_s = rule.decode(errors="replace")
    if verdict == b"a":
        _log(5, f"fallback for {name}: {why}; snapshot allows (rule {rule_s})")
        return _exec_modprobe(modprobe, name)
    if header.get(b"mode") == b"permissive":
        _log(4, f"fallback for {name}: {why}; snapshot would deny (rule {rule_s}), permissive")
        return _exec_modprobe(modprobe, name)
    _log(4, f"fallback for {name}: {why}; snapshot denies (rule {rule_s})")
    return _deny(name)


def decide(name: str) -> int:
    raw = os.fsencode(name)
    if not valid_name(raw):
        _log(4, f"denied invalid request name {raw[: NAME_MAX * 2]!r}")
        return _deny("?")
    rdir = runtime_dir()
    snapshot_path = rdir + "/" + SNAPSHOT_FILE
    reply = ask_daemon(rdir + "/" + DECIDE_SOCKET, raw)
    if reply is None:
        return _from_snapshot(snapshot_path, name, "daemon did not answer")
    verdict, _, _rule = reply.partition(b" ")
    if verdict == b"allow":
        return _exec_modprobe(read_modprobe_path(snapshot_path), name)
    if verdict == b"deny":
        return _deny(name)
    why = "daemon error: " + reply[:200].decode(errors="replace")
    return _from_snapshot(snapshot_path, name, why)


def deny_stub(name: str) -> int:
    """`HELPER --deny NAME`: the install command of the rendered modprobe.d (layer 2)."""
    raw = os.fsencode(name)
    shown = name if valid_name(raw) else repr(raw[: NAME_MAX * 2])
    _log(4, f"denied {shown} through modprobe.d")
    return _deny(name)


def main(argv: list[str]) -> int:
    _fds_to_devnull()
    args = argv[1:]
    if len(args) == 3 and args[0] == "-q" and args[1] == "--":
        return decide(args[2])
    if len(args) == 2 and args[0] == "--deny":
        return deny_stub(args[1])
    shown = " ".join(repr(a) for a in args)[:300]
    _log(3, f"usage error: expected '-q -- NAME' or '--deny NAME', got {shown}")
    _trace()
    return EXIT_USAGE


if __name__ == "__main__":
    # os._exit, not sys.exit: tearing the interpreter down costs ~3 ms CPU per run, a fifth
    # of the whole helper (make bench, docs/benchmarks.md), and nothing needs flushing:
    # fds 0-2 are /dev/null and every log line is sent synchronously.
    os._exit(main(sys.argv))
