"""The daemon: start-up to READY=1, memory, 50 concurrent decide clients, reload latency,
and the wall time of the kmodctl verbs that talk to it."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.clients import run_load
from bench.stats import Cmp, Figure, Goal, percentile, summary
from bench.system import KMODCTL, SITE_POLICY, Daemon, Root
from kmodd import helper

CLIENTS = 50  # the kernel's cap on concurrent helpers
RELOAD_POLL_S = 0.005
RELOAD_TIMEOUT_S = 30.0


def startup_figures(make: Callable[[], Daemon], runs: int) -> tuple[list[Figure], Daemon]:
    """RUNS cold starts (the last daemon is left running for the other benches)."""
    seconds: list[float] = []
    rss: list[float] = []
    daemon = make()
    for i in range(runs):
        if i:
            daemon.stop()
            daemon = make()
        seconds.append(daemon.start() * 1000)
        rss.append(daemon.rss_mb())
    return [
        summary(
            "daemon_ready_ms",
            seconds,
            goal=Goal(Cmp.LE, 1000),
            note="exec to READY=1 (first generation built and published)",
        ),
        summary("daemon_rss_start_mb", rss, "MiB", goal=Goal(Cmp.LE, 80), note="VmRSS at READY"),
    ], daemon


def request_names(mix: list[str], total: int, hostile_every: int) -> list[str]:
    """The realistic mix, with every HOSTILE_EVERY-th request a never-seen name (what a
    local user gets from `mount -t <random>`): these defeat the decision cache and test
    that its bound holds memory."""
    names = []
    for i in range(total):
        if hostile_every and i % hostile_every == 0:
            names.append(f"fs-bench{i}")
        else:
            names.append(mix[i % len(mix)])
    return names


def load_figures(d: Daemon, mix: list[str], rounds: int, per_round: int) -> list[Figure]:
    sock = d.r.runtime / helper.DECIDE_SOCKET
    run_load(sock, mix, CLIENTS, min(len(mix), 5_000))  # warm: libkmod pages, the cache
    rss_before = d.rss_mb()
    latencies: list[float] = []
    rates: list[float] = []
    errors = 0
    for k in range(rounds):
        names = request_names(mix[k:] + mix[:k], per_round, hostile_every=10)
        load = run_load(sock, names, CLIENTS, per_round)
        latencies += load.latencies_ms
        rates.append(load.per_s)
        errors += load.errors
    rss_after = d.rss_mb()
    n = len(latencies)
    lo, hi = min(latencies), max(latencies)
    total = rounds * per_round
    return [
        Figure("daemon_p50_ms", percentile(latencies, 50), "ms", lo, hi, n, note="per request"),
        Figure(
            "daemon_p99_ms",
            percentile(latencies, 99),
            "ms",
            lo,
            hi,
            n,
            Goal(Cmp.LE, 2),
            note=f"{CLIENTS} clients in flight",
        ),
        summary(
            "daemon_decisions_per_s",
            rates,
            "/s",
            goal=Goal(Cmp.GE, 5000),
            note=f"median of {rounds} rounds of {per_round:,}; 1 in 10 names never seen",
        ),
        Figure("daemon_errors", errors, goal=Goal(Cmp.LE, 0)),
        Figure(
            "daemon_rss_after_mb",
            rss_after,
            "MiB",
            goal=Goal(Cmp.LE, 80),
            note=f"after {total:,} more decisions",
        ),
        Figure(
            "daemon_rss_growth_mb",
            rss_after - rss_before,
            "MiB",
            goal=Goal(Cmp.LE, 5),
            note=f"over those {total:,} decisions",
        ),
    ]


def _wait_generation(d: Daemon, above: int) -> float:
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    while (gen := d.generation()) <= above:
        if time.monotonic() > deadline:
            raise RuntimeError(f"generation stuck at {gen}")
        time.sleep(RELOAD_POLL_S)
    return time.perf_counter()


def _replace(path: Path, text: str) -> float:
    """An editor's save (write a temp file, rename over); the moment of the rename."""
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_text(text)
    moment = time.perf_counter()
    tmp.rename(path)
    return moment


def reload_figures(d: Daemon, runs: int) -> list[Figure]:
    """Write a modprobe.d file / a policy file; time until the new generation is live
    (polled over the control socket every 5 ms, so +2.5 ms on average)."""
    r: Root = d.r
    samples: dict[str, list[float]] = {"reload_modprobe_d_ms": [], "reload_policy_ms": []}
    for i in range(runs):
        gen = d.generation()
        at = _replace(r.modprobe_d / "bench.conf", f"options dummy numdummies={i + 1}\n")
        samples["reload_modprobe_d_ms"].append((_wait_generation(d, gen) - at) * 1000)
        gen = d.generation()
        at = _replace(r.site_policy, SITE_POLICY + f"# edit {i}\n")
        samples["reload_policy_ms"].append((_wait_generation(d, gen) - at) * 1000)
    goal = Goal(Cmp.LE, 500)
    return [
        summary(
            "reload_modprobe_d_ms",
            samples["reload_modprobe_d_ms"],
            goal=goal,
            note="etc/modprobe.d write to new generation live (debounce included)",
        ),
        summary(
            "reload_policy_ms",
            samples["reload_policy_ms"],
            goal=goal,
            note="etc/kmodd/policy.d write to new generation live",
        ),
    ]


def kmodctl_figures(d: Daemon, runs: int) -> list[Figure]:
    argv = [str(KMODCTL), "--runtime-dir", str(d.r.runtime), "status", "--json"]
    subprocess.run(argv, capture_output=True, check=True)  # .pyc files written
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        samples.append((time.perf_counter() - start) * 1000)
    return [summary("kmodctl_status_wall_ms", samples, note="`kmodctl status --json`")]
