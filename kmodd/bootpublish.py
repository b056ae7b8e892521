#!/usr/bin/python3 -IS
# SPDX-License-Identifier: LGPL-2.1-or-later
"""kmodd-boot-publish: put the last good policy generation in place before udev starts.

kmodd-boot-publish.service runs it early (once the store is mounted, before
systemd-udevd, udev trigger and systemd-modules-load; not after local-fs.target).  It
verifies the last-good store the daemon wrote (ROOT/var/lib/kmodd/last-good: manifest +
rendered modprobe.d file + helper snapshot)
and, when the manifest's inputs digest still matches this boot's inputs (policy files,
modprobe.d dirs, the module tree's index files, the kmodd.* kernel arguments, the
release), publishes both files into /run/modprobe.d and /run/kmodd (and points
kernel.modprobe at the helper when the daemon did).  Otherwise it says why and leaves the
slow path to the daemon.  `--wait S` (kmodd-boot-wait.service, the slow path only) waits
until the daemon published, so udev never starts before enforcement is in place.

Rules for this file (like helper.py; docs/operations.md "Boot"):
- stdlib only, imports nothing from kmodd; kmodd.daemon.persist and kmodd.paths import its
  format, digest and constants, so daemon and boot step compute ONE digest;
- start-up is the cost (goal 50 ms, make bench boot_publish_ms): no argparse, json, re,
  hashlib (OpenSSL's sha256 directly: the builtin one hashes the 3 MB of index files in
  ~60 ms, OpenSSL in ~3 ms).

Exit: 0 published, or not published and why (slow path); 1 store refused (torn,
tampered, unsafe) or --wait timed out; 2 usage.
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False  # mypy reads this as True; no `import typing` at run time (~4 ms)
if TYPE_CHECKING:
    from collections.abc import Callable

try:
    from _hashlib import openssl_sha256 as _sha256
except ImportError:  # a Python without OpenSSL
    from hashlib import sha256 as _sha256


# ----------------------------------------------------------------------------------------
# Contract constants (kmodd.paths and kmodd.daemon.persist import these; tests pin the
# copies of helper.py's constants).

POLICY_DIRS = ("usr/lib/kmodd/policy.d", "etc/kmodd/policy.d", "run/kmodd/policy.d")
MODPROBE_D_DIRS = (
    "etc/modprobe.d",
    "run/modprobe.d",
    "usr/local/lib/modprobe.d",
    "usr/lib/modprobe.d",
    "lib/modprobe.d",
)
ENFORCEMENT_FILE = "run/modprobe.d/00-kmodd.conf"
STORE_DIR = "var/lib/kmodd/last-good"
MANIFEST = "manifest"
MANIFEST_MAGIC = b"kmodd-last-good 1\n"
MANIFEST_MAX = 64 << 10
PAYLOAD_MAX = 32 << 20  # the snapshot is ~200 KB, the helper reads at most 16 MiB
INPUT_FILE_MAX = 64 << 20  # modules.alias.bin of a big tree is ~1.5 MB
# What libkmod reads of the module tree (depmod rewrites them together).
INDEX_FILES = (
    "modules.dep.bin",
    "modules.alias.bin",
    "modules.symbols.bin",
    "modules.builtin.bin",
    "modules.builtin.alias.bin",
    "modules.builtin.modinfo",
    "modules.builtin",
    "modules.softdep",
    "modules.weakdep",
    "modules.devname",
)
INPUTS = ("policy", "modprobe_d", "modules", "cmdline", "release")
CMDLINE_PREFIX = "kmodd."
PUBLISHED_FILE = "published"  # in the runtime dir: who put enforcement in place this boot
# Copies of kmodd/helper.py's constants (tests/test_bootpublish.py pins them equal).
RUNTIME_DIR = "/run/kmodd"
RUNTIME_DIR_ENV = "KMODD_RUNTIME_DIR"
SNAPSHOT_FILE = "snapshot"
MODPROBE_PREVIOUS = "modprobe_path.previous"  # = kmodd.host.modprobe_path.PREVIOUS_FILE
PROC_MODPROBE = "/proc/sys/kernel/modprobe"

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2


class StoreError(Exception):
    """The store is torn, tampered with or unsafe: refused as a whole."""


# ----------------------------------------------------------------------------------------
# Safety: who could change or move a path.


def unsafe_path(path: str) -> str | None:
    """Why PATH (an existing directory or file) is not safe to trust, or None.

    PATH itself must be owned by root (or whoever runs us: a user checking their own
    draft) and not writable by group or others; every parent likewise (unsafe_parent).
    """
    why = _unsafe_stat(path, os.stat(path), os.geteuid(), os.getegid())
    if why is not None:
        return f"{path} is {why}"
    found = unsafe_parent(path)
    if found is None:
        return None
    return f"its parent {found[0]} is {found[1]}, who could move {path} away"


def unsafe_parent(path: str) -> tuple[str, str] | None:
    """(parent, why) for the first parent of PATH (as named, and as resolved) that
    someone other than root may write or owns: they could rename PATH away and put
    another in its place.  A sticky world-writable parent (/tmp) is safe when the child
    is root's (or ours): others may not rename it."""
    euid, egid = os.geteuid(), os.getegid()
    chains = [os.path.abspath(path)]
    real = os.path.realpath(path)
    if real != chains[0]:
        chains.append(real)
    for start in chains:
        child = start
        while child != "/":
            parent = os.path.dirname(child)
            st = os.stat(parent)
            why = _unsafe_stat(parent, st, euid, egid)
            sticky = st.st_mode & 0o1000 and st.st_uid in (0, euid)
            if why is not None and sticky and os.lstat(child).st_uid in (0, euid):
                why = None  # sticky (/tmp): only the child's owner may rename it
            if why is not None:
                return parent, why
            child = parent
    return None


def _unsafe_stat(path: str, st: os.stat_result, euid: int, egid: int) -> str | None:
    if st.st_uid not in (0, euid):
        return f"owned by uid {st.st_uid}"
    if st.st_mode & 0o002:
        return "writable by every user"
    if st.st_mode & 0o020 and st.st_gid not in (0, egid):
        return f"writable by group {st.st_gid}"
    return None


# ----------------------------------------------------------------------------------------
# The inputs digest: what a generation was built from.


def _read_bounded(path: str, limit: int) -> bytes | None:
    """A regular file's bytes (following symlinks, never blocking on a FIFO), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return None
    try:
        if (os.fstat(fd).st_mode & 0o170000) != 0o100000:
            return None
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks) if size <= limit else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _feed_file(update: Callable[[bytes], object], path: str, name: str) -> None:
    update(b"F" + os.fsencode(name) + b"\0")
    try:
        if os.path.islink(path):
            update(b"L" + os.fsencode(os.readlink(path)) + b"\0")
    except OSError:
        update(b"E\0")
    data = _read_bounded(path, INPUT_FILE_MAX)
    if data is None:
        update(b"N\0")
    else:
        update(b"%d\0" % len(data) + data)


def _feed_dir(
    update: Callable[[bytes], object],
    directory: str,
    rel: str,
    keep: Callable[[str], bool],
    skip: str | None,
) -> None:
    update(b"D" + rel.encode() + b"\0")
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:  # the same as empty: /run/modprobe.d at boot, before us
        return
    except OSError as err:
        update(b"error %d\0" % (err.errno or 0))
        return
    for name in names:
        if not name.startswith(".") and keep(name) and name != skip:
            _feed_file(update, directory + "/" + name, name)


def input_digests(root: str, release: str, module_dir: str, cmdline: str) -> dict[str, str]:
    """sha256 per input (INPUTS) for a root: relative paths only, so --root is neutral."""
    root = root.rstrip("/")
    out = {}
    h = _sha256()
    for rel in POLICY_DIRS:
        _feed_dir(h.update, root + "/" + rel, rel, lambda n: n.endswith(".yaml"), None)
    out["policy"] = h.hexdigest()
    h = _sha256()
    ours = os.path.basename(ENFORCEMENT_FILE)
    for rel in MODPROBE_D_DIRS:
        skip = ours if rel == os.path.dirname(ENFORCEMENT_FILE) else None
        _feed_dir(h.update, root + "/" + rel, rel, lambda n: True, skip)
    out["modprobe_d"] = h.hexdigest()
    h = _sha256()
    h.update(module_dir.encode() + b"\0")
    for name in INDEX_FILES:
        _feed_file(h.update, root + "/" + module_dir + "/" + name, name)
    out["modules"] = h.hexdigest()
    text = _read_bounded(cmdline, 1 << 16) or b""
    args = [w for w in text.split() if w.startswith(CMDLINE_PREFIX.encode())]
    out["cmdline"] = _sha256(b"\n".join(args)).hexdigest()
    out["release"] = _sha256(release.encode()).hexdigest()
    return out


def combined(inputs: dict[str, str]) -> str:
    return _sha256("".join(f"{k} {inputs[k]}\n" for k in INPUTS).encode()).hexdigest()


# ----------------------------------------------------------------------------------------
# The manifest: `key value` lines after the magic, sealed by a sha256 of everything before.
#   kmodd-last-good 1\n  generation N\n hash H\n policy_hash H\n mode M\n release R\n
#   module_dir lib/modules/R\n created UNIX\n kernel_modprobe PATH|-\n policy_dirs D...\n
#   input NAME HEX\n (one per INPUTS) inputs HEX\n file KIND NAME SHA256 SIZE\n ...
#   seal HEX\n


def format_manifest(fields: dict[str, str], files: dict[str, tuple[str, str, int]]) -> bytes:
    lines = [f"{key} {value}" for key, value in fields.items()]
    lines += [f"file {kind} {name} {sha} {size}" for kind, (name, sha, size) in files.items()]
    body = MANIFEST_MAGIC + ("\n".join(lines) + "\n").encode()
    return body + b"seal " + _sha256(body).hexdigest().encode() + b"\n"


def parse_manifest(data: bytes) -> tuple[dict[str, str], dict[str, tuple[str, str, int]]]:
    """(fields, files) of a sealed manifest; StoreError when torn, foreign or edited."""
    if not data.startswith(MANIFEST_MAGIC):
        raise StoreError("not a kmodd last-good manifest (bad magic)")
    at = data.rfind(b"seal ")
    if at < 0 or not data.endswith(b"\n") or data[at - 1 : at] != b"\n":
        raise StoreError("manifest is torn (no seal line)")
    if data[at + 5 : -1] != _sha256(data[:at]).hexdigest().encode():
        raise StoreError("manifest seal does not match its content (torn or edited)")
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, str, int]] = {}
    for line in data[len(MANIFEST_MAGIC) : at].decode("utf-8", "replace").splitlines():
        key, _, value = line.partition(" ")
        if key == "file":
            kind, name, sha, size = [*value.split(" "), "", "", ""][:4]
            if "/" in name or name.startswith(".") or not size.isdigit():
                raise StoreError(f"manifest names an unsafe file {name!r}")
            files[kind] = (name, sha, int(size))
        elif key == "input":
            name, _, digest = value.partition(" ")
            fields[f"input {name}"] = digest
        else:
            fields[key] = value
    for key in ("generation", "hash", "release", "module_dir", "inputs"):
        if not fields.get(key):
            raise StoreError(f"manifest lacks {key!r}")
    if not fields["generation"].isdigit() or set(files) != {"enforcement", "snapshot"}:
        raise StoreError("manifest is incomplete")
    return fields, files


def _read_store_file(store: str, name: str, limit: int) -> bytes:
    path = store + "/" + name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        raise StoreError(f"cannot open {path}: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        why = _unsafe_stat(path, st, os.geteuid(), os.getegid())
        if (st.st_mode & 0o170000) != 0o100000 or why is not None:
            raise StoreError(f"{path} is {why or 'not a regular file'}")
        data = os.read(fd, limit + 1)
        while len(data) <= limit and (chunk := os.read(fd, 1 << 20)):
            data += chunk
    finally:
        os.close(fd)
    if len(data) > limit:
        raise StoreError(f"{path} is larger than {limit} bytes")
    return data


def read_manifest(store: str) -> tuple[dict[str, str], dict[str, tuple[str, str, int]]] | None:
    """The verified manifest of STORE, None when there is none (first boot)."""
    if not os.path.lexists(store + "/" + MANIFEST):
        return None
    if os.path.islink(store) or not os.path.isdir(store):
        raise StoreError(f"{store} is not a real directory")
    why = unsafe_path(store)
    if why is not None:
        raise StoreError(why)
    return parse_manifest(_read_store_file(store, MANIFEST, MANIFEST_MAX))


def read_payloads(store: str, files: dict[str, tuple[str, str, int]]) -> dict[str, bytes]:
    out = {}
    for kind, (name, sha, size) in files.items():
        data = _read_store_file(store, name, PAYLOAD_MAX)
        if len(data) != size or _sha256(data).hexdigest() != sha:
            raise StoreError(f"{store}/{name} does not match the manifest (torn or edited)")
        out[kind] = data
    return out


# ----------------------------------------------------------------------------------------
# Publishing.


def write_atomic(path: str, data: bytes, mode: int) -> None:
    """Temp file + rename, names relative to an O_NOFOLLOW dir fd (kmodd.atomic's
    rules, which this file may not import), but no fsync: everything written here is in
    /run, which no crash outlives, and readers only need the rename's atomicity (the six
    fsyncs were 18 of 45 ms on a disk-backed test root)."""
    directory, name = os.path.split(path)
    if not os.path.isdir(directory):
        os.makedirs(directory, 0o755, exist_ok=True)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        tmp = f".{name}.{os.getpid()}.boot.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, mode, dir_fd=dir_fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def point_modprobe(sysctl: str, helper: str, runtime: str) -> str:
    """kernel.modprobe -> HELPER as the daemon does it (kmodd.host.modprobe_path):
    the replaced value remembered for uninstall, an empty value (autoload off) kept."""
    try:
        with open(sysctl, "rb") as handle:
            current = handle.read(4096).decode(errors="replace").rstrip("\n")
    except OSError as err:
        return f"kernel.modprobe not managed: {err.strerror}"
    if not current.strip():
        return "kernel.modprobe is empty (autoload off): left alone"
    if current == helper:
        return f"kernel.modprobe already {helper}"
    if not os.path.isfile(helper) or not os.stat(helper).st_mode & 0o111:
        return f"kernel.modprobe left at {current}: helper {helper} is not executable"
    write_atomic(runtime + "/" + MODPROBE_PREVIOUS, current.encode() + b"\n", 0o644)
    fd = os.open(sysctl, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, helper.encode() + b"\n")
    finally:
        os.close(fd)
    return f"kernel.modprobe -> {helper} (was {current})"


class _NotPublished(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


def verify(root: str, opts: dict[str, str]) -> tuple[dict[str, str], dict[str, bytes]]:
    """(manifest fields, payloads) when the store may be published; else _NotPublished."""
    store = root + "/" + STORE_DIR
    try:
        found = read_manifest(store)
    except (StoreError, OSError) as err:
        raise _NotPublished(EXIT_REFUSED, f"refused the last-good store {store}: {err}") from None
    if found is None:
        raise _NotPublished(EXIT_OK, f"no last good generation in {store} (first start)")
    fields, files = found
    number, built_for = fields["generation"], fields["release"]
    if built_for != opts["kernel"]:
        why = f"generation {number} was built for {built_for}, this is {opts['kernel']}"
        raise _NotPublished(EXIT_OK, why)
    module_dir = fields["module_dir"]
    if module_dir.startswith("/") or ".." in module_dir.split("/"):
        raise _NotPublished(EXIT_REFUSED, f"refused {store}: unsafe module_dir {module_dir!r}")
    now = input_digests(root or "/", opts["kernel"], module_dir, opts["cmdline"])
    changed = [k for k in INPUTS if fields.get("input " + k) != now[k]]
    if changed or combined(now) != fields["inputs"]:
        what = ", ".join(changed) or "inputs"
        raise _NotPublished(EXIT_OK, f"inputs changed since generation {number} ({what})")
    try:
        return fields, read_payloads(store, files)
    except (StoreError, OSError) as err:
        raise _NotPublished(EXIT_REFUSED, f"refused the last-good store {store}: {err}") from None


def publish(opts: dict[str, str]) -> tuple[int, str]:
    """Verify and publish; (exit status, what happened)."""
    root = opts["root"].rstrip("/")
    try:
        fields, payloads = verify(root, opts)
    except _NotPublished as skip:
        return skip.code, skip.text + "; slow path: the daemon builds the policy"
    runtime = opts["runtime"]
    write_atomic(root + "/" + ENFORCEMENT_FILE, payloads["enforcement"], 0o644)
    write_atomic(runtime + "/" + SNAPSHOT_FILE, payloads["snapshot"], 0o600)
    note = ""
    helper = fields.get("kernel_modprobe", "-")
    if helper.startswith("/") and opts["sysctl"]:
        note = "; " + point_modprobe(opts["sysctl"], helper, runtime)
    number, content = fields["generation"], fields["hash"]
    write_atomic(
        runtime + "/" + PUBLISHED_FILE,
        f"boot-publish generation {number} hash {content}\n".encode(),
        0o644,
    )
    return EXIT_OK, f"published last good generation {number} ({content[:12]}){note}"


def wait_for_daemon(runtime: str, seconds: float) -> tuple[int, str]:
    """The slow path: block (udev is ordered after us) until somebody published."""
    path = runtime + "/" + PUBLISHED_FILE
    deadline = time.monotonic() + seconds
    while True:
        data = _read_bounded(path, 4096)
        if data:
            text = data.decode(errors="replace").strip()
            if text.startswith("none"):  # the daemon gave up: udev goes on, said loudly
                return EXIT_REFUSED, f"kmodd enforces nothing ({text})"
            return EXIT_OK, "enforcement in place: " + text
        if time.monotonic() >= deadline:
            return EXIT_REFUSED, (
                f"kmodd published nothing within {seconds:g} s: udev starts without the "
                "kmodd modprobe.d file (see journalctl -u kmodd)"
            )
        time.sleep(0.02)


# ----------------------------------------------------------------------------------------
# The program.

USAGE = (
    "usage: kmodd-boot-publish [--root DIR] [--kernel RELEASE] [--runtime-dir DIR]"
    " [--cmdline FILE] [--modprobe-sysctl FILE|''] [--wait SECONDS]"
)
_OPTIONS = ("--root", "--kernel", "--runtime-dir", "--cmdline", "--modprobe-sysctl", "--wait")


def parse_args(argv: list[str]) -> dict[str, str] | None:
    opts = {
        "root": "/",
        "kernel": os.uname().release,
        "runtime": os.environ.get(RUNTIME_DIR_ENV) or RUNTIME_DIR,
        "cmdline": "/proc/cmdline",
        "sysctl": "",
        "wait": "",
    }
    names = {"--runtime-dir": "runtime", "--modprobe-sysctl": "sysctl"}
    explicit_sysctl = False
    args = list(argv)
    while args:
        flag = args.pop(0)
        if flag not in _OPTIONS or not args:
            return None
        opts[names.get(flag, flag[2:])] = args.pop(0)
        explicit_sysctl = explicit_sysctl or flag == "--modprobe-sysctl"
    if not explicit_sysctl and opts["root"].rstrip("/") == "" and os.path.exists(PROC_MODPROBE):
        opts["sysctl"] = PROC_MODPROBE  # the live root only, as the daemon does
    return opts


def _say(priority: int, text: str) -> None:
    # journald reads <N> prefixes on a service's stdout (sd-daemon(3)); a terminal does not.
    prefix = f"<{priority}>" if os.environ.get("JOURNAL_STREAM") else ""
    data = f"{prefix}kmodd-boot-publish: {text}\n".encode(errors="replace")
    try:
        os.write(1, data)
    except OSError:  # no stdout (closed, or a full pipe): the exit status still says it
        return


def main(argv: list[str]) -> int:
    start = time.monotonic()
    opts = parse_args(argv[1:])
    if opts is None:
        _say(3, USAGE)
        return EXIT_USAGE
    try:
        if opts["wait"]:
            code, text = wait_for_daemon(opts["runtime"], float(opts["wait"]))
        else:
            code, text = publish(opts)
    except (OSError, ValueError) as err:
        code, text = EXIT_REFUSED, f"failed: {err}; slow path: the daemon builds"
    ms = (time.monotonic() - start) * 1e3
    _say(5 if code == EXIT_OK else 3, f"{text} ({ms:.1f} ms)")
    return code


if __name__ == "__main__":
    os._exit(main(sys.argv))
