"""`make bench`: every kmodd benchmark on the real kernel tree, one `name: value` line per
figure, then the same table with the machine's description in docs/benchmarks.md.

    .venv/bin/python -m bench            full run (~3-4 min, then one VM boot ~10-15 min
                                         under TCG for the kernel layer and two real boots
                                         ~10 min for the critical chain), writes
                                         docs/benchmarks.md
    .venv/bin/python -m bench --no-vm    without the VM figures
    .venv/bin/python -m bench --realboot-results DIR
                                         the chain share from a real-boot run's results
    .venv/bin/python -m bench --quick    a few iterations each (the smoke test), no doc

When a private journald can run (root, systemd-journald present) the whole run happens in
a mount namespace where /run/systemd/journal and /dev/log are that journald's: the daemon
journals every decision and the helper syslogs its fallbacks as they would in production,
and the host's journal sees nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench import (
    bench_core,
    boot_bench,
    daemon_bench,
    helper_bench,
    kernel_vm,
    realboot_bench,
    spawn,
)
from bench.report import machine, print_figures, table, write_doc
from bench.stats import Figure
from bench.system import REPO, Daemon, temp_root
from tests import journald
from tests.kerneltree import KernelTree, ensure_kernel_tree

DOC = REPO / "docs/benchmarks.md"
INSIDE_ENV = "KMODD_BENCH_JOURNAL"  # set inside the namespace: "NAMESPACE PID" of journald


@dataclass(frozen=True, slots=True)
class Plan:
    core_runs: int
    starts: int
    helper_runs: int
    storm_rounds: int
    load_rounds: int
    load_per_round: int
    reloads: int
    cli_runs: int


FULL = Plan(21, 5, 40, 20, 5, 20_000, 5, 9)
QUICK = Plan(3, 1, 3, 1, 2, 500, 1, 2)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few iterations, no doc (smoke test)")
    p.add_argument("--doc", type=Path, help=f"write the table here (default: {DOC})")
    p.add_argument("--no-doc", action="store_true", help="only print")
    p.add_argument("--no-journald", action="store_true", help="daemon logs to a file")
    p.add_argument("--no-vm", action="store_true", help="skip the VM boot (kernel layer)")
    p.add_argument(
        "--vm-results", type=Path, help="the VM figures from a saved `python -m bench.kernel_vm`"
    )
    p.add_argument(
        "--realboot-results",
        type=Path,
        metavar="DIR",
        help="the critical-chain share from a real-boot run's kept results (its work dir)",
    )
    return p.parse_args(argv)


def runtime_figures(
    tree: KernelTree, plan: Plan, mix: list[str], journald_pid: int | None
) -> tuple[list[Figure], list[Figure]]:
    """(the runtime figures, the kmodctl ones), in the order the doc lists them."""
    with temp_root(tree) as r:
        helper_path = spawn.install_helper(r.top / "libexec/kmodd-modprobe")

        def make() -> Daemon:
            return Daemon(r, helper_path, helper_bench.TRUE)

        gen = daemon_bench.generation_figures(r, mix, plan.starts)
        print_figures(gen)
        start, daemon = daemon_bench.startup_figures(make, plan.starts)
        try:
            print_figures(start)
            setup = helper_bench.HelperSetup(
                r, helper_path, helper_bench.dead_runtime_dir(r, r.top / "dead"), tree.root
            )
            single = helper_bench.single_figures(setup, plan.helper_runs)
            print_figures(single)
            by_name = {f.name: f for f in single}
            storm = helper_bench.storm_figures(
                setup,
                plan.storm_rounds,
                by_name["helper_deny_ms"],
                by_name["helper_deny_cpu_ms"],
            )
            print_figures(storm)
            load = daemon_bench.load_figures(
                daemon, mix, plan.load_rounds, plan.load_per_round, journald_pid
            )
            print_figures(load)
            reload = daemon_bench.reload_figures(daemon, plan.reloads)
            print_figures(reload)
            cli = daemon_bench.kmodctl_figures(daemon, plan.cli_runs)
            print_figures(cli)
        finally:
            daemon.stop()
        boot = boot_bench.boot_publish_figures(r, plan.helper_runs)  # the store it left
        print_figures(boot)
        # The doc's order: the figures first, what explains them after.
        return single + storm + boot + start + load + reload + gen, cli


def run(args: argparse.Namespace, journal: str, journald_pid: int | None = None) -> int:
    plan = QUICK if args.quick else FULL
    tree = ensure_kernel_tree()
    info = machine(tree.release, journal)
    for key, value in info.items():
        print(f"# {key}: {value}", flush=True)
    core, mix = bench_core.core_figures(tree, plan.core_runs)
    print_figures(core)
    runtime, cli = runtime_figures(tree, plan, mix, journald_pid)
    ordered = runtime + core + cli + vm_figures(args) + realboot_figures(args)
    if not (args.no_doc or (args.quick and args.doc is None)):
        command = "make bench" if not args.quick else "python -m bench --quick"
        write_doc(args.doc or DOC, table(ordered, info, command))
    missed = [f.name for f in ordered if f.met is False]
    print(f"# goals missed: {', '.join(missed) if missed else 'none'}", flush=True)
    return 0


def vm_figures(args: argparse.Namespace) -> list[Figure]:
    """The kernel layer's figures from one VM boot (bench.kernel_vm); none with --quick or
    --no-vm.  A failed boot is printed, not fatal: the host figures stand on their own."""
    if args.quick or args.no_vm:
        print("# vm: skipped (--quick or --no-vm)", flush=True)
        return []
    if args.vm_results is not None:
        doc = json.loads(args.vm_results.read_text())
    else:
        print("# vm: booting Debian's kernel under qemu for the kernel layer", flush=True)
        doc = kernel_vm.boot_results()
    try:
        figs = kernel_vm.figures(doc)
    except (RuntimeError, KeyError, TypeError) as err:
        print(f"# vm: no figures: {err}", flush=True)
        return []
    print_figures(figs)
    return figs


def realboot_figures(args: argparse.Namespace) -> list[Figure]:
    """kmodd's share of the boot's critical chain from two real boots (bench.realboot_bench,
    systemd as PID 1); none with --quick or --no-vm.  A failed boot is printed, not fatal."""
    if args.quick or args.no_vm:
        print("# realboot: skipped (--quick or --no-vm)", flush=True)
        return []
    try:
        if args.realboot_results is not None:
            doc = realboot_bench.saved_results(args.realboot_results)
        else:
            print("# realboot: booting the real-boot image twice (systemd as PID 1)", flush=True)
            doc = realboot_bench.boot_results()
        figs = realboot_bench.figures(doc)
    except (RuntimeError, OSError, KeyError, TypeError, ValueError) as err:
        print(f"# realboot: no figures: {err.__class__.__name__}: {err}", flush=True)
        return []
    print_figures(figs)
    return figs


def _journald_pid(namespace: str) -> int:
    """The pid of `systemd-journald NAMESPACE` (its CPU per record is a figure)."""
    want = [journald.JOURNALD.encode(), namespace.encode()]
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().split(b"\0")[:2] == want:
                return int(proc.name)
        except OSError:
            continue
    raise RuntimeError(f"no systemd-journald {namespace} running")


def in_journal_namespace(argv: list[str]) -> int:
    """Start a private journald, then run this very command inside its namespace."""
    with (
        tempfile.TemporaryDirectory(prefix="kmodd-bench-jd-") as scratch,
        journald.running_journald(Path(scratch)) as jd,
    ):
        env = {**os.environ, INSIDE_ENV: f"{jd.namespace} {_journald_pid(jd.namespace)}"}
        cmd = jd.wrap([sys.executable, "-m", "bench", *argv])
        return subprocess.run(cmd, env=env, cwd=REPO, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    inside = os.environ.get(INSIDE_ENV)
    if inside:
        namespace, pid = inside.split()
        return run(args, f"private systemd-journald (namespace {namespace})", int(pid))
    if args.no_journald or journald.available() is not None:
        return run(args, "none: the daemon's records go to a log file")
    return in_journal_namespace(argv)


if __name__ == "__main__":
    sys.exit(main())
