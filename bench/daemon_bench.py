"""The daemon: start-up to READY=1, memory, 50 concurrent decide clients, reload latency,
and the wall time of the kmodctl verbs that talk to it."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.clients import Load, run_load
from bench.stats import Cmp, Figure, Goal, percentile, summary
from bench.system import KMODCTL, KMODD, SITE_POLICY, Daemon, Root
from kmodd import helper
from kmodd.daemon.decider import Decider
from kmodd.daemon.generation import BuildOptions, Generation, build_generation, publish
from kmodd.daemon.journal import JournalSink
from kmodd.daemon.treeindex import TreeIndex
from kmodd.paths import make_paths
from kmodd.policy.types import Source

CLIENTS = 50  # the kernel's cap on concurrent helpers


def generation_figures(r: Root, mix: list[str], runs: int) -> list[Figure]:
    """What start-up and every reload are made of: build + publish one generation
    (load, compile, render enforcement, resolve and decide every name for the snapshot),
    in this process, reusing what the last build kept as the daemon does (TreeIndex); and
    decisions/s through the Decider, the daemon's own path (its one decision cache)."""
    paths = make_paths(str(r.root), r.release, str(r.top / "gen-runtime"))
    paths.runtime_dir.mkdir(exist_ok=True)
    options = BuildOptions(modprobe="/bin/true", cmdline=r.top / "cmdline")
    samples: list[float] = []
    gen: Generation | None = None
    index = TreeIndex()
    for number in range(1, runs + 1):
        start = time.perf_counter()
        built = publish(build_generation(number, paths, options, index))
        samples.append((time.perf_counter() - start) * 1000)
        if gen is not None:
            gen.close()
        gen = built
    assert gen is not None
    try:
        rates = _generation_rates(gen, mix, max(3, runs))
    finally:
        gen.close()
    return [
        summary(
            "generation_build_ms",
            samples,
            note="load + compile + render + snapshot + publish, in-process",
        ),
        summary(
            "decisions_per_s_generation",
            rates,
            "/s",
            goal=Goal(Cmp.GE, 10_000),
            note="Decider.answer (the daemon's path), mix with 1 in 10 names never seen",
        ),
    ]


def _generation_rates(gen: Generation, mix: list[str], rounds: int) -> list[float]:
    decider = Decider(JournalSink(lambda _record: None))  # never started: nothing emitted
    decider.use(gen)
    for name in mix:  # warm, like a daemon that has been up for a while
        decider.answer(name, Source.KERNEL)
    rates = []
    for k in range(rounds):
        names = request_names(mix, 20_000, hostile_every=10, salt=f"g{k}-")
        start = time.process_time()
        for name in names:
            decider.answer(name, Source.KERNEL)
        rates.append(len(names) / (time.process_time() - start))
    return rates


def import_figure(runs: int) -> Figure:
    """`kmodd --version`: interpreter start + every module the daemon imports up front."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([str(KMODD), "--version"], capture_output=True, check=True)
        samples.append((time.perf_counter() - start) * 1000)
    return summary("daemon_import_ms", samples, note="`kmodd --version`: Python + imports")


def startup_figures(make: Callable[[], Daemon], runs: int) -> tuple[list[Figure], Daemon]:
    """RUNS cold starts (the last daemon is left running for the other benches)."""
    seconds: list[float] = []
    rss: list[float] = []
    daemon = make()
    try:
        for i in range(runs):
            if i:
                daemon.stop()
                daemon = make()
            seconds.append(daemon.start() * 1000)
            rss.append(daemon.rss_mb())
    except BaseException:
        daemon.stop()  # never leave a daemon behind (a start that timed out, ^C)
        raise
    return [
        import_figure(max(3, runs)),
        summary(
            "daemon_ready_ms",
            seconds,
            goal=Goal(Cmp.LE, 1000),
            note="exec to READY=1 (first generation built and published)",
        ),
        summary("daemon_rss_start_mb", rss, "MiB", goal=Goal(Cmp.LE, 80), note="VmRSS at READY"),
    ], daemon


def request_names(mix: list[str], total: int, hostile_every: int, salt: str = "") -> list[str]:
    """The realistic mix, with every HOSTILE_EVERY-th request a never-seen name (what a
    local user gets from `mount -t <random>`): these defeat the decision cache and test
    that its bound holds memory."""
    names = []
    for i in range(total):
        if hostile_every and i % hostile_every == 0:
            names.append(f"fs-bench{salt}{i}")
        else:
            names.append(mix[i % len(mix)])
    return names


def _cpu_s(pid: int) -> float:
    """utime + stime of every thread of PID (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def single_client_figures(d: Daemon, mix: list[str], total: int) -> list[Figure]:
    """One client, one request at a time: the round trip without queueing."""
    load = run_load(d.r.runtime / helper.DECIDE_SOCKET, mix, 1, total)
    lat = load.latencies_ms
    lo, hi, n = min(lat), max(lat), len(lat)
    return [
        Figure("daemon_single_p50_ms", percentile(lat, 50), "ms", lo, hi, n, note="1 client"),
        Figure("daemon_single_p99_ms", percentile(lat, 99), "ms", lo, hi, n, note="1 client"),
    ]


def load_figures(
    d: Daemon, mix: list[str], rounds: int, per_round: int, journald_pid: int | None = None
) -> list[Figure]:
    sock = d.r.runtime / helper.DECIDE_SOCKET
    run_load(sock, mix, CLIENTS, min(len(mix), 5_000))  # warm: libkmod pages, the cache
    single = single_client_figures(d, mix, min(per_round, 3_000))
    rss_before = d.rss_mb()
    pids = {"daemon": d.pid, "client": os.getpid()}
    if journald_pid is not None:
        pids["journald"] = journald_pid
    cpu_before = {who: _cpu_s(pid) for who, pid in pids.items()}
    loads: list[Load] = []
    for k in range(rounds):
        names = request_names(mix[k:] + mix[:k], per_round, hostile_every=10, salt=f"d{k}-")
        loads.append(run_load(sock, names, CLIENTS, per_round))
    cpu_us = {
        who: (_cpu_s(pid) - cpu_before[who]) * 1e6 / (rounds * per_round)
        for who, pid in pids.items()
    }
    rss_after = d.rss_mb()
    latencies = [ms for load in loads for ms in load.latencies_ms]
    rates = [load.per_s for load in loads]
    errors = sum(load.errors for load in loads)
    n = len(latencies)
    lo, hi = min(latencies), max(latencies)
    total = rounds * per_round
    rate = sorted(rates)[len(rates) // 2]
    return [
        *single,
        Figure(
            "daemon_p50_ms",
            percentile(latencies, 50),
            "ms",
            lo,
            hi,
            n,
            note=f"per request; Little's law: {CLIENTS} in flight / rate = "
            f"{CLIENTS / rate * 1000:.1f} ms",
        ),
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
        *_cpu_figures(cpu_us),
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


def _cpu_figures(cpu_us: dict[str, float]) -> list[Figure]:
    """CPU per decision of every process on the path: with N cores no rate can exceed
    N x 1e6 / their sum, whatever the daemon does."""
    ncpu = os.cpu_count() or 1
    total = sum(cpu_us.values())
    figs = [
        Figure(
            "daemon_cpu_us_per_decision",
            cpu_us["daemon"],
            "us",
            note=f"all threads; alone it could do {1e6 / cpu_us['daemon']:,.0f}/s per core",
        ),
        Figure("client_cpu_us_per_decision", cpu_us["client"], "us", note="the 50 clients"),
    ]
    if "journald" in cpu_us:
        figs.append(
            Figure("journald_cpu_us_per_decision", cpu_us["journald"], "us", note="one record")
        )
    figs.append(
        Figure(
            "daemon_cpu_bound_per_s",
            ncpu * 1e6 / total,
            "/s",
            note=f"{ncpu} CPUs / CPU of daemon + clients + journal per decision",
        )
    )
    return figs


def _replace(path: Path, text: str) -> float:
    """An editor's save (write a temp file, rename over); the moment of the rename."""
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_text(text)
    moment = time.perf_counter()
    tmp.rename(path)
    return moment


def _reload_ms(d: Daemon, path: Path, text: str) -> tuple[float, float]:
    """Save PATH; the ms until READY=1 says the new generation is live, and the ms the
    daemon says it spent building it (status: last_reload.duration_s)."""
    before = d.generation()
    at = _replace(path, text)
    ms = (d.wait_ready(at) - at) * 1000
    doc = d.status()
    if doc["generation"] is None or int(doc["generation"]["number"]) <= before:
        raise RuntimeError(f"READY=1 after saving {path.name} but no new generation")
    return ms, float(doc["last_reload"]["duration_s"]) * 1000


def reload_figures(d: Daemon, runs: int) -> list[Figure]:
    """Save a modprobe.d file / a policy file; time until the daemon's READY=1 (sent once
    the new generation is swapped in, as systemd sees it)."""
    r: Root = d.r
    samples: dict[str, list[tuple[float, float]]] = {"modprobe_d": [], "policy": []}
    for i in range(runs):
        conf = f"options dummy numdummies={i + 1}\n"
        samples["modprobe_d"].append(_reload_ms(d, r.modprobe_d / "bench.conf", conf))
        samples["policy"].append(_reload_ms(d, r.site_policy, SITE_POLICY + f"# edit {i}\n"))
    goal = Goal(Cmp.LE, 500)
    builds = [build for pairs in samples.values() for _ms, build in pairs]
    return [
        summary(
            "reload_modprobe_d_ms",
            [ms for ms, _build in samples["modprobe_d"]],
            goal=goal,
            note="etc/modprobe.d save to READY=1 of the new generation (debounce included)",
        ),
        summary(
            "reload_policy_ms",
            [ms for ms, _build in samples["policy"]],
            goal=goal,
            note="etc/kmodd/policy.d save to READY=1 of the new generation",
        ),
        summary(
            "reload_build_ms",
            builds,
            note="of which building the generation (status last_reload.duration_s)",
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
