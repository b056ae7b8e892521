"""`kmodd`: the daemon's entry point and its one composition root.

Everything with I/O is built here and injected: journal sink, notifier, kernel.modprobe
manager, watcher, udev source, sockets.  Heavy edges (watchdog, pyudev) are imported only
when enabled.  Runs in the foreground, systemd style (Type=notify).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import grp
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from kmodd import __version__, helper
from kmodd.contract.journal import Priority
from kmodd.daemon import records
from kmodd.daemon.core import Core
from kmodd.daemon.events import ReloadCause, ReloadRequested, Stop
from kmodd.daemon.generation import BuildOptions
from kmodd.daemon.journal import JournalSink, default_sender, stream_sender
from kmodd.daemon.kernel_layer import KernelEdge
from kmodd.daemon.lastgood import LastGood
from kmodd.daemon.metrics_writer import DEFAULT_PATH as METRICS_PATH
from kmodd.daemon.metrics_writer import INTERVAL_S as METRICS_INTERVAL_S
from kmodd.daemon.metrics_writer import MetricsWriter
from kmodd.daemon.notify import Notifier
from kmodd.daemon.ports import Edges
from kmodd.daemon.server import Kind, Server, activated_sockets, bind_unix, prepare_runtime_dir
from kmodd.daemon.startup import START_CAP_S, StartLimits
from kmodd.errors import KmoddError
from kmodd.host.kconfig import static_usermodehelper
from kmodd.host.modprobe_path import PROC_MODPROBE, ModprobePath
from kmodd.paths import HELPER_PATH, Paths, make_paths

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
Cleanup = list[Callable[[], object]]


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kmodd",
        description="Kernel-module policy daemon: decides module loads for the kernel's "
        "modprobe helper, renders the policy into modprobe.d, logs every decision.",
    )
    p.add_argument("--version", action="version", version=f"kmodd {__version__}")
    p.add_argument("--root", default="/", metavar="DIR", help="system root (default: /)")
    p.add_argument("--kernel", metavar="RELEASE", help="kernel release (default: uname -r)")
    p.add_argument("--runtime-dir", metavar="DIR", help=f"default: {helper.RUNTIME_DIR}")
    p.add_argument(
        "--modprobe",
        default=helper.DEFAULT_MODPROBE,
        metavar="PATH",
        help="the real modprobe the helper execs on allow (snapshot header)",
    )
    p.add_argument(
        "--helper-path",
        default=HELPER_PATH,
        metavar="PATH",
        help="the installed helper, for kernel.modprobe and the deny stub",
    )
    p.add_argument(
        "--deny-stub",
        metavar="CMD",
        help="install command for denied modules (default: HELPER --deny)",
    )
    p.add_argument(
        "--status-group",
        metavar="GROUP",
        help="group that may read status over control.sock (0660)",
    )
    p.add_argument(
        "--no-modprobe-path",
        action="store_true",
        help="leave kernel.modprobe alone (implied when --root is not /)",
    )
    p.add_argument(
        "--modprobe-sysctl",
        metavar="FILE",
        help=f"manage this file as kernel.modprobe (default: {PROC_MODPROBE}; tests)",
    )
    p.add_argument(
        "--reassert",
        action="store_true",
        help="point kernel.modprobe back at the helper when it was changed",
    )
    p.add_argument(
        "--cmdline",
        default="/proc/cmdline",
        metavar="FILE",
        help="kernel command line (kmodd.mode=permissive escape hatch)",
    )
    p.add_argument("--no-watch", action="store_true", help="do not watch files")
    p.add_argument("--no-udev", action="store_true", help="do not listen to uevents")
    p.add_argument(
        "--no-kernel-layer",
        action="store_true",
        help="do not load the BPF LSM layer (docs/attribution.md); pins already there stay",
    )
    p.add_argument(
        "--metrics-file",
        metavar="PATH",
        help="write Prometheus metrics here for node_exporter's textfile collector"
        f" (e.g. {METRICS_PATH}; default: none)",
    )
    p.add_argument(
        "--metrics-interval",
        type=float,
        default=METRICS_INTERVAL_S,
        metavar="S",
        help=f"rewrite the metrics file every S seconds (default: {METRICS_INTERVAL_S:g})",
    )
    p.add_argument(
        "--start-cap",
        type=float,
        default=START_CAP_S,
        metavar="SECONDS",
        help="give up (exit 75) when the first generation is not built in this time; until "
        f"then systemd's start timeout is extended (default: {START_CAP_S:g})",
    )
    p.add_argument(
        "--log-stderr",
        action="store_true",
        help="log records to stderr even when journald is there",
    )
    return p


def _status_gid(name: str | None) -> int | None:
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise KmoddError(
            f"no such group {name!r}", hint="create it or drop --status-group"
        ) from None


def _listeners(paths: Paths, gid: int | None, cleanup: Cleanup) -> dict[Kind, socket.socket]:
    found = activated_sockets()
    for kind, path, mode, group in (
        (Kind.DECIDE, paths.decide_socket, 0o600, None),
        (Kind.CONTROL, paths.control_socket, 0o600 if gid is None else 0o660, gid),
    ):
        if kind not in found:
            found[kind] = bind_unix(path, mode, group)
            cleanup.append(functools.partial(path.unlink, missing_ok=True))
    return found


def _modprobe_path(args: argparse.Namespace, paths: Paths, core: Core) -> None:
    """Point kernel.modprobe at the helper (live root only) and say what the kernel does."""
    warning = static_usermodehelper(paths.release, paths.root)
    if warning is not None:
        core.edges.static_usermodehelper = warning
        core.notes.append(warning)
        core.sink.emit(records.notice(warning, Priority.WARNING))
    # With --root the sysctl is only touched when named explicitly (tests, images).
    explicit = args.modprobe_sysctl is not None
    if args.no_modprobe_path or (paths.root != Path("/") and not explicit):
        return
    sysctl = Path(args.modprobe_sysctl) if explicit else PROC_MODPROBE
    mp = ModprobePath(Path(args.helper_path), paths.runtime_dir, proc_path=sysctl)
    if not mp.available:
        note = "kernel.modprobe does not exist (kernel without module support): not managed"
        core.notes.append(note)
        return
    try:
        already = mp.read() == args.helper_path
        previous = mp.install()
    except KmoddError as err:
        core.notes.append(str(err))
        core.sink.emit(records.notice(f"cannot manage kernel.modprobe: {err}", Priority.ERR))
        return
    core.edges.modprobe_path = mp
    if core.edges.last_good is not None:  # the boot step points it there too next boot
        core.edges.last_good.kernel_modprobe = args.helper_path
    # At boot it is pointed before kmodd starts (kmodd-boot-publish on the fast path, the
    # sysctl.d drop-in otherwise): say so, rather than "was /sbin/modprobe" from the memo.
    text = (
        f"kernel.modprobe already {args.helper_path} (set before kmodd started; uninstall "
        f"restores {previous})"
        if already
        else f"kernel.modprobe -> {args.helper_path} (was {previous})"
    )
    core.sink.emit(records.notice(text))


def _watcher(args: argparse.Namespace, paths: Paths, core: Core, cleanup: Cleanup) -> None:
    if args.no_watch:
        return
    from kmodd.daemon.watch import Watcher  # noqa: PLC0415 -- watchdog costs ~50 ms

    # Create run/modprobe.d before watching it, so publishing the first generation into it
    # is not seen as a new directory (which would trigger a needless second generation).
    with contextlib.suppress(OSError):
        paths.enforcement_file.parent.mkdir(mode=0o755, exist_ok=True)
    watcher = Watcher(paths, core.post)
    watcher.start()
    core.edges.watcher = watcher
    cleanup.append(watcher.stop)


def _udev(args: argparse.Namespace, paths: Paths, core: Core, cleanup: Cleanup) -> None:
    # Also with --root: the devices are this machine's, the policy and tree the root's.
    if args.no_udev:
        return
    from kmodd.daemon.udev import UdevSource  # noqa: PLC0415 -- pyudev costs ~30 ms

    source = UdevSource(core.post)
    try:
        source.start()
    except KmoddError as err:
        core.notes.append(f"udev: {err}")
        core.sink.emit(records.notice(f"udev monitor unavailable: {err}", Priority.WARNING))
        return
    cleanup.append(source.stop)
    core.edges.udev = source

    def coldplug() -> None:
        for device in source.coldplug():
            core.post(device)

    core.edges.recoldplug = coldplug
    coldplug()


def _signals(core: Core) -> None:
    def stop(signum: int, _frame: FrameType | None) -> None:
        core.post(Stop(signal.Signals(signum).name))

    def reload(_signum: int, _frame: FrameType | None) -> None:
        core.post(ReloadRequested(ReloadCause.SIGNAL))

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)


def _kernel(args: argparse.Namespace, core: Core, cleanup: Cleanup) -> None:
    """The BPF LSM layer (only for the live system): attached, or inactive with why."""
    if args.no_kernel_layer or Path(args.root) != Path("/"):
        return
    edge = KernelEdge.start(core.post)
    core.edges.kernel = edge
    cleanup.append(edge.stop)
    state = edge.state()
    text = f"kernel layer {'active' if edge.active else 'inactive'}: {state['reason']}"
    core.sink.emit(records.notice(text, Priority.NOTICE if edge.active else Priority.WARNING))
    if not edge.active:
        core.notes.append(text)


def run(args: argparse.Namespace) -> int:
    paths = make_paths(args.root, args.kernel, args.runtime_dir)
    gid = _status_gid(args.status_group)
    prepare_runtime_dir(paths.runtime_dir)
    sink = JournalSink(stream_sender(sys.stderr) if args.log_stderr else default_sender())
    sink.start()
    options = BuildOptions(
        modprobe=args.modprobe,
        deny_stub=args.deny_stub or f"{args.helper_path} --deny",
        cmdline=Path(args.cmdline),
    )
    # No relay thread: Notifier.send is non-blocking, a manager that stops reading costs a
    # counted drop (tests/daemon/test_lifecycle.py, a deaf NOTIFY_SOCKET), never a stall.
    notifier = Notifier()
    limits = StartLimits(cap_s=args.start_cap)
    notifier.extend_timeout(limits.extend_usec())  # the setup below: udev, BPF (TCG: seconds)
    last_good = LastGood(paths, options, sink)
    last_good.load()
    edges = Edges(notifier=notifier, reassert=args.reassert, last_good=last_good)
    core = Core(paths, options, sink, edges, limits)
    if args.metrics_file:
        core.housekeeper.metrics = MetricsWriter(
            Path(args.metrics_file), sink, max(1.0, args.metrics_interval)
        )
    cleanup: Cleanup = [sink.stop, core.close]
    try:
        server = Server(_listeners(paths, gid, cleanup), core, status_gid=gid)
        cleanup.append(server.close)
        _signals(core)
        _modprobe_path(args, paths, core)
        _watcher(args, paths, core, cleanup)
        _udev(args, paths, core, cleanup)
        _kernel(args, core, cleanup)
        code = core.run(server)
    finally:
        for step in reversed(cleanup):
            with contextlib.suppress(Exception):
                step()
    if core.builder_running:  # stopped mid-build: the gate is closed, do not wait for it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return run(args)
    except KmoddError as err:
        print(f"kmodd: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
