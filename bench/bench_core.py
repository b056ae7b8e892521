"""Core benchmark: decisions/s in-process, policy load time, snapshot/enforcement build
time and `kmodctl explain` wall time, on the real Debian kernel tree.

Run: `.venv/bin/python -m bench.bench_core` (prints `name: value` lines).
Goals (issue 2): >= 10,000 decisions/s on one core; explain < 300 ms wall.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kmodd.kmod.context import KmodContext
from kmodd.policy.compiler import exact_request_aliases, render_enforcement, render_snapshot
from kmodd.policy.engine import CompiledPolicy, Request, compile_policy, decide
from kmodd.policy.loader import load_policy_files
from kmodd.policy.types import Source
from tests.kerneltree import ensure_kernel_tree

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "policies/10-baseline.yaml"
KMODCTL = Path(sys.executable).with_name("kmodctl")


def emit(name: str, value: float | int | str, unit: str = "") -> None:
    shown = f"{value:.1f}" if isinstance(value, float) else str(value)
    print(f"{name}: {shown}{(' ' + unit) if unit else ''}", flush=True)


def median_ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def request_mix(ctx: KmodContext) -> list[str]:
    """Module names, kernel request aliases, modalias-shaped and unresolvable names."""
    modules = list(ctx.module_names())[::8]
    aliases = list(exact_request_aliases(ctx))[::2]
    modaliases = [p.replace("*", "0") for p, _m in ctx.alias_patterns()[::40] if ":" in p]
    unknown = [f"net-pf-{n}" for n in range(100, 140)] + [f"fs-nope{n}" for n in range(40)]
    return modules + aliases + modaliases[:300] + unknown


def bench_decisions(
    ctx_factory: Callable[[], KmodContext], policy: CompiledPolicy, names: list[str], label: str
) -> None:
    ctx = ctx_factory()
    try:
        requests = [Request(n, Source.KERNEL) for n in names]
        # warm-up pass (libkmod index pages, our caches when enabled)
        for request in requests:
            decide(request, ctx.resolve(request.name), policy)
        rounds = 3
        start = time.process_time()
        for _ in range(rounds):
            for request in requests:
                decide(request, ctx.resolve(request.name), policy)
        elapsed = time.process_time() - start
    finally:
        ctx.close()
    emit(f"decisions_per_s_{label}", int(rounds * len(requests) / elapsed), "/s (CPU time)")


def bench_engine_only(ctx: KmodContext, policy: CompiledPolicy, names: list[str]) -> None:
    pairs = [(Request(n), ctx.resolve(n)) for n in names]
    start = time.process_time()
    for _ in range(5):
        for request, resolution in pairs:
            decide(request, resolution, policy)
    elapsed = time.process_time() - start
    emit("decide_only_per_s", int(5 * len(pairs) / elapsed), "/s (resolution excluded)")


def child_cpu_ms(argv: list[str], env: dict[str, str], runs: int) -> float:
    """Median user+sys CPU of a child: robust where wall time is not (a busy machine)."""
    samples = []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(argv, capture_output=True, check=False, env=env)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        samples.append(cpu * 1000)
    return statistics.median(samples)


def bench_explain(root: Path, release: str) -> None:
    argv = [
        str(KMODCTL),
        "--root",
        str(root),
        "--kernel",
        release,
        "explain",
        "net-pf-5",
        "--policy",
        str(BASELINE),
        "--json",
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(argv, capture_output=True, check=False, env=env)  # writes .pyc files
    ms = median_ms(lambda: subprocess.run(argv, capture_output=True, check=False, env=env), 9)
    emit("kmodctl_explain_wall_ms", ms, "ms (median of 9)")
    emit("kmodctl_explain_cpu_ms", child_cpu_ms(argv, env, 9), "ms user+sys (median of 9)")
    help_argv = [str(KMODCTL), "--help"]
    ms = median_ms(lambda: subprocess.run(help_argv, capture_output=True, check=False, env=env), 9)
    emit("kmodctl_help_wall_ms", ms, "ms (median of 9)")
    emit("cpu_count", os.cpu_count() or 0)
    emit("load_average_1min", os.getloadavg()[0])


def main() -> int:
    tree = ensure_kernel_tree()
    emit("kernel_release", tree.release)
    emit(
        "policy_load_validate_ms",
        median_ms(lambda: load_policy_files([BASELINE]), 21),
        "ms (baseline, median of 21)",
    )
    policy = compile_policy(load_policy_files([BASELINE]))
    emit(
        "policy_compile_ms",
        median_ms(lambda: compile_policy(load_policy_files([BASELINE])), 21),
        "ms (load + compile)",
    )
    with KmodContext(tree.root, tree.release) as ctx:
        names = request_mix(ctx)
        emit("request_mix_names", len(names))
        bench_engine_only(ctx, policy, names)
        start = time.perf_counter()
        text = render_enforcement(policy, ctx)
        lines = len(text.splitlines())
        emit("enforcement_render_ms", (time.perf_counter() - start) * 1000, f"ms ({lines} lines)")
    with KmodContext(tree.root, tree.release, cache_size=1 << 16) as ctx:
        start = time.perf_counter()
        snap = render_snapshot(policy, ctx, decide, 1)
        entries = snap.count(b"\n") - 7  # magic, 4 header lines, blank line, end
        emit(
            "snapshot_build_ms",
            (time.perf_counter() - start) * 1000,
            f"ms ({entries} entries, {len(snap)} bytes)",
        )
    big = 1 << 16
    bench_decisions(
        lambda: KmodContext(tree.root, tree.release, cache_size=big), policy, names, "cached"
    )
    bench_decisions(
        lambda: KmodContext(tree.root, tree.release, cache_size=1), policy, names, "uncached"
    )
    bench_explain(tree.root, tree.release)
    return 0


if __name__ == "__main__":
    sys.exit(main())
