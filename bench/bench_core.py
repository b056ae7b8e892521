"""Core benchmark: decisions/s in-process, policy load time, snapshot/enforcement build
time and `kmodctl explain` wall time, on the real Debian kernel tree.

Run: `.venv/bin/python -m bench.bench_core` (prints `name: value` lines), or everything
with `make bench`.  Goals (issue 2 and 5): >= 10,000 decisions/s on one core; explain
< 300 ms wall.
"""

from __future__ import annotations

import functools
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.stats import Cmp, Figure, Goal, summary
from kmodd.kmod.context import KmodContext
from kmodd.policy.compiler import exact_request_aliases, render_enforcement, render_snapshot
from kmodd.policy.engine import CompiledPolicy, Request, compile_policy, decide
from kmodd.policy.loader import load_policy_files
from kmodd.policy.types import Source
from tests.kerneltree import KernelTree, ensure_kernel_tree

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "policies/10-baseline.yaml"
KMODCTL = Path(sys.executable).with_name("kmodctl")


def samples_ms(fn: Callable[[], object], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def request_mix(ctx: KmodContext) -> list[str]:
    """Module names, kernel request aliases, modalias-shaped and unresolvable names."""
    modules = list(ctx.module_names())[::8]
    aliases = list(exact_request_aliases(ctx))[::2]
    modaliases = [p.replace("*", "0") for p, _m in ctx.alias_patterns()[::40] if ":" in p]
    unknown = [f"net-pf-{n}" for n in range(100, 140)] + [f"fs-nope{n}" for n in range(40)]
    return modules + aliases + modaliases[:300] + unknown


def bench_decisions(
    ctx_factory: Callable[[], KmodContext],
    policy: CompiledPolicy,
    names: list[str],
    label: str,
    rounds: int,
) -> Figure:
    """Resolve + decide every name, ROUNDS passes after a warm-up pass; CPU time, since
    the goal is per core and the machine may be shared."""
    ctx = ctx_factory()
    rates = []
    try:
        requests = [Request(n, Source.KERNEL) for n in names]
        for request in requests:  # warm-up: libkmod index pages, our caches when enabled
            decide(request, ctx.resolve(request.name), policy)
        for _ in range(rounds):
            start = time.process_time()
            for request in requests:
                decide(request, ctx.resolve(request.name), policy)
            rates.append(len(requests) / (time.process_time() - start))
    finally:
        ctx.close()
    return summary(
        f"decisions_per_s_{label}",
        rates,
        "/s",
        note=f"resolve + decide, resolution cache {'on' if label == 'cached' else 'off'}",
    )


def bench_engine_only(
    ctx: KmodContext, policy: CompiledPolicy, names: list[str], rounds: int
) -> Figure:
    pairs = [(Request(n), ctx.resolve(n)) for n in names]
    rates = []
    for _ in range(rounds):
        start = time.process_time()
        for request, resolution in pairs:
            decide(request, resolution, policy)
        rates.append(len(pairs) / (time.process_time() - start))
    return summary("decide_only_per_s", rates, "/s", note="engine only, resolution excluded")


def child_cpu_ms(argv: list[str], env: dict[str, str], runs: int) -> list[float]:
    """User+sys CPU of a child: robust where wall time is not (a busy machine)."""
    samples = []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(argv, capture_output=True, check=False, env=env)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        samples.append(cpu * 1000)
    return samples


def bench_explain(root: Path, release: str, runs: int) -> list[Figure]:
    argv = [str(KMODCTL), "--root", str(root), "--kernel", release, "explain", "net-pf-5"]
    argv += ["--policy", str(BASELINE), "--json"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(argv, capture_output=True, check=False, env=env)  # writes .pyc files

    def child() -> None:
        subprocess.run(argv, capture_output=True, check=False, env=env)

    help_argv = [str(KMODCTL), "--help"]
    goal = Goal(Cmp.LE, 300)
    return [
        summary("kmodctl_explain_wall_ms", samples_ms(child, runs), goal=goal, note="offline"),
        summary("kmodctl_explain_cpu_ms", child_cpu_ms(argv, env, runs), note="user+sys"),
        summary(
            "kmodctl_help_wall_ms",
            samples_ms(
                lambda: subprocess.run(help_argv, capture_output=True, check=False, env=env),
                runs,
            ),
        ),
    ]


def build_figures(tree: KernelTree, runs: int) -> tuple[list[Figure], list[str]]:
    """Policy load/compile, enforcement and snapshot build; also the request mix."""
    figs = [
        summary("policy_load_validate_ms", samples_ms(lambda: load_policy_files([BASELINE]), runs)),
        summary(
            "policy_compile_ms",
            samples_ms(lambda: compile_policy(load_policy_files([BASELINE])), runs),
            note="load + compile",
        ),
    ]
    policy = compile_policy(load_policy_files([BASELINE]))
    with KmodContext(tree.root, tree.release) as ctx:
        names = request_mix(ctx)
        figs.append(Figure("request_mix_names", len(names), note="modules, aliases, modaliases"))
        figs.append(bench_engine_only(ctx, policy, names, max(1, runs // 4)))
        lines = len(render_enforcement(policy, ctx).splitlines())
        render = samples_ms(lambda: render_enforcement(policy, ctx), max(1, runs // 7))
        figs.append(summary("enforcement_render_ms", render, note=f"{lines} lines"))
    with KmodContext(tree.root, tree.release, cache_size=1 << 16) as ctx:
        snap = render_snapshot(policy, ctx, decide, 1)
        entries = snap.count(b"\n") - 7  # magic, 4 header lines, blank line, end

        def build() -> None:
            render_snapshot(policy, ctx, decide, 1)

        figs.append(
            summary(
                "snapshot_build_ms",
                samples_ms(build, max(1, runs // 7)),
                note=f"{entries} entries, {len(snap)} bytes",
            )
        )
    return figs, names


def core_figures(tree: KernelTree, runs: int = 21) -> tuple[list[Figure], list[str]]:
    """Every core figure, and the request mix (the daemon bench reuses it)."""
    figs, names = build_figures(tree, runs)
    policy = compile_policy(load_policy_files([BASELINE]))
    rounds = max(1, runs // 4)
    for label, size in (("cached", 1 << 16), ("uncached", 1)):
        factory = functools.partial(KmodContext, tree.root, tree.release, cache_size=size)
        figs.append(bench_decisions(factory, policy, names, label, rounds))
    figs += bench_explain(tree.root, tree.release, max(1, runs // 2))
    return figs, names


def main() -> int:
    figs, _names = core_figures(ensure_kernel_tree())
    for fig in figs:
        print(fig.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
