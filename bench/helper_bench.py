"""The helper as the kernel runs it: deny, allow overhead, fallback, and a 50-helper storm.

Everything is spawned with the kernel's env and fds 0-2 closed (bench.spawn), the helper
being the file `kmodctl install` writes (shebang `#!/usr/bin/python3 -IS`), exec'd
directly so the kernel's binfmt_script path is what we time.  Baselines run interleaved
with the helper (bench.stats.interleaved), so every ratio compares the same load.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import spawn
from bench.stats import Cmp, Figure, Goal, interleaved, percentile, ratio, summary
from bench.system import Root
from kmodd import helper

DENY_NAME = "algif-aead"  # baseline rule copy-fail (what socket(AF_ALG)+bind("aead") asks)
ALLOW_NAME = "fs-vfat"  # no rule: default allow
MISSING_NAME = "bench-no-such-module"
TRUE = "/bin/true"  # the daemon's --modprobe: allow execs it, so overhead = allow - true
STORM_SIZE = 50  # the kernel's cap on concurrent usermode helpers (kmod_concurrent_max)
STORM_HANG_S = 30.0


@dataclass(frozen=True, slots=True)
class HelperSetup:
    r: Root
    helper_path: Path
    fallback_dir: Path  # the snapshot + a dead decide.sock: a crashed daemon
    modprobe_root: Path  # the kernel tree root, for modprobe -d


def dead_runtime_dir(r: Root, where: Path) -> Path:
    """A runtime dir as a crashed daemon leaves it: its last snapshot and a socket file
    nobody listens on (connect gets ECONNREFUSED, like after SIGKILL)."""
    where.mkdir(mode=0o755, exist_ok=True)
    snapshot = (r.runtime / helper.SNAPSHOT_FILE).read_bytes()
    (where / helper.SNAPSHOT_FILE).write_bytes(snapshot)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(where / helper.DECIDE_SOCKET))
    return where


def _timer(argv: list[str], env: dict[str, str], expect: int) -> Callable[[], spawn.Run]:
    def once() -> spawn.Run:
        result = spawn.run(argv, env)
        if result.status != expect:
            raise RuntimeError(f"{argv} exited {result.status}, expected {expect}")
        return result

    return once


def single_figures(s: HelperSetup, runs: int) -> list[Figure]:
    live = spawn.kernel_env({helper.RUNTIME_DIR_ENV: str(s.r.runtime)})
    dead = spawn.kernel_env({helper.RUNTIME_DIR_ENV: str(s.fallback_dir)})
    plain = spawn.kernel_env()
    h = str(s.helper_path)
    modprobe = ["/sbin/modprobe", "-q", "-d", str(s.modprobe_root), "-S", s.r.release]
    jobs = {
        "python_floor_ms": _timer([spawn.PYTHON, "-IS", "-c", "pass"], plain, 0),
        "modprobe_miss_ms": _timer([*modprobe, MISSING_NAME], plain, 1),
        "true_exec_ms": _timer([TRUE], plain, 0),
        "helper_deny_ms": _timer([h, "-q", "--", DENY_NAME], live, 1),
        "helper_allow_ms": _timer([h, "-q", "--", ALLOW_NAME], live, 0),
        "helper_fallback_ms": _timer([h, "-q", "--", DENY_NAME], dead, 1),
    }
    samples = interleaved(jobs, runs)
    fig = {name: summary(name, [r.wall_ms for r in rs]) for name, rs in samples.items()}
    for name in ("python_floor", "helper_deny"):  # the CPU of the same runs
        cpu = f"{name}_cpu_ms"
        fig[cpu] = summary(cpu, [r.cpu_ms for r in samples[f"{name}_ms"]])
    floor, deny = fig["python_floor_ms"], fig["helper_deny_ms"]
    allow, true = fig["helper_allow_ms"], fig["true_exec_ms"]
    overhead = Figure(
        "helper_allow_overhead_ms",
        allow.value - true.value,
        "ms",
        note=f"helper_allow_ms {allow.value:.2f} - true_exec_ms {true.value:.2f}",
    )
    return [
        _noted(floor, "`/usr/bin/python3 -IS -c pass`"),
        _noted(fig["modprobe_miss_ms"], f"`modprobe -q` (kmod) of {MISSING_NAME}"),
        _noted(true, "exec of /bin/true"),
        _noted(deny, f"daemon answers deny ({DENY_NAME})"),
        _noted(allow, f"daemon answers allow, helper execs {TRUE}"),
        overhead,
        _noted(fig["helper_fallback_ms"], "dead socket: snapshot denies, syslog line"),
        ratio("helper_deny_vs_floor", deny, floor, goal=Goal(Cmp.LE, 1.5)),
        ratio("helper_deny_vs_modprobe", deny, fig["modprobe_miss_ms"]),
        ratio("helper_fallback_vs_floor", fig["helper_fallback_ms"], floor),
        _noted(fig["python_floor_cpu_ms"], "user+sys CPU of the floor"),
        _noted(fig["helper_deny_cpu_ms"], "user+sys CPU of a deny"),
        ratio("helper_deny_vs_floor_cpu", fig["helper_deny_cpu_ms"], fig["python_floor_cpu_ms"]),
        compile_figure(s),
    ]


def compile_figure(s: HelperSetup, runs: int = 50) -> Figure:
    """A script is compiled on every run (only imported modules get a .pyc): this is
    what the installed helper pays for its own source before doing anything."""
    source = s.helper_path.read_bytes()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        compile(source, str(s.helper_path), "exec")
        samples.append((time.perf_counter() - start) * 1000)
    return summary(
        "helper_source_compile_ms", samples, note=f"compile() of its {len(source):,} bytes"
    )


def _noted(f: Figure, note: str) -> Figure:
    return Figure(f.name, f.value, f.unit, f.low, f.high, f.runs, f.goal, note)


@dataclass
class StormRound:
    latencies_ms: list[float]
    wall_ms: float
    errors: int
    hangs: int


def storm_round(s: HelperSetup, size: int = STORM_SIZE) -> StormRound:
    """SIZE helpers started back to back (half deny, half allow), each timed from its own
    spawn to its own exit; a helper still running after STORM_HANG_S is killed: a hang.
    pidfds (not wait4(-1)) so that a kill can never hit a reused pid."""
    env = spawn.kernel_env({helper.RUNTIME_DIR_ENV: str(s.r.runtime)})
    h = str(s.helper_path)
    running: dict[int, tuple[int, float, int]] = {}  # pidfd -> pid, spawned at, exit code
    poller = select.poll()
    t0 = time.perf_counter()
    for i in range(size):
        name, expect = (DENY_NAME, 1) if i % 2 == 0 else (ALLOW_NAME, 0)
        pid = spawn.start([h, "-q", "--", name], env)
        pidfd = os.pidfd_open(pid)
        running[pidfd] = (pid, time.perf_counter(), expect)
        poller.register(pidfd, select.POLLIN)
    latencies: list[float] = []
    errors = hangs = 0
    deadline = t0 + STORM_HANG_S
    while running:
        left_ms = max(0, int((deadline - time.perf_counter()) * 1000))
        ready = poller.poll(left_ms)
        if not ready:  # hung: kill what is left, count it
            for pidfd in running:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            ready = [(pidfd, select.POLLIN) for pidfd in running]
            hangs = len(running)
        now = time.perf_counter()
        for pidfd, _event in ready:
            pid, begin, expect = running.pop(pidfd)
            poller.unregister(pidfd)
            os.close(pidfd)
            _pid, wstatus = os.waitpid(pid, 0)
            latencies.append((now - begin) * 1000)
            if not hangs and os.waitstatus_to_exitcode(wstatus) != expect:
                errors += 1
    return StormRound(latencies, (time.perf_counter() - t0) * 1000, errors, hangs)


def storm_figures(s: HelperSetup, rounds: int, single: Figure, cpu: Figure) -> list[Figure]:
    all_ms: list[float] = []
    walls: list[float] = []
    errors = hangs = 0
    for _ in range(rounds):
        one = storm_round(s)
        all_ms += one.latencies_ms
        walls.append(one.wall_ms)
        errors += one.errors
        hangs += one.hangs
    p50 = percentile(all_ms, 50)
    p99 = percentile(all_ms, 99)
    n = len(all_ms)
    ncpu = os.cpu_count() or 1
    # No scheduler can finish 50 helpers before 50 x their CPU time / cores has passed.
    bound = STORM_SIZE * cpu.value / ncpu
    return [
        Figure("storm_p50_ms", p50, "ms", min(all_ms), max(all_ms), n, note="per helper"),
        Figure("storm_p99_ms", p99, "ms", min(all_ms), max(all_ms), n, note="per helper"),
        summary("storm_round_ms", walls, note=f"{STORM_SIZE} helpers, first spawn to last exit"),
        Figure("storm_errors", errors + hangs, "", goal=Goal(Cmp.LE, 0), note=f"hangs: {hangs}"),
        Figure(
            "storm_p99_vs_single",
            p99 / single.value,
            "x",
            goal=Goal(Cmp.LE, 4),
            note=f"storm_p99_ms / {single.name}",
        ),
        Figure(
            "storm_cpu_bound_ms",
            bound,
            "ms",
            note=f"{STORM_SIZE} x {cpu.name} / {ncpu} CPUs: no schedule finishes sooner",
        ),
        Figure(
            "storm_p99_vs_cpu_bound",
            p99 / bound,
            "x",
            note="storm_p99_ms / storm_cpu_bound_ms",
        ),
    ]
