"""The metrics file for node_exporter's textfile collector: the renderer on its own, then
the real daemon's file after real decisions (through the helper, as the kernel runs it) and
real reloads, read back value by value and checked with Debian's `promtool check metrics`."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodd.contract.journal import Record
from kmodd.contract.status import DecisionCounters
from kmodd.daemon.journal import JournalSink
from kmodd.daemon.metrics import DecisionCount, GenerationMetric, RuleMetric, Snapshot, render
from kmodd.daemon.metrics_writer import MetricsWriter
from kmodd.daemon.view import CoreView
from kmodd.paths import make_paths
from tests.conftest import IN_CI, root_required
from tests.daemon.running import BASE_POLICY, Daemon, SystemRoot, make_root, run_helper
from tests.kerneltree import KernelTree

REPO = Path(__file__).resolve().parents[2]
PROMTOOL = REPO / ".cache/promtool/promtool"  # `make promtool` (Debian's prometheus .deb)
_SAMPLE = re.compile(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"')

HELD = "helper,modprobe_d"  # a kernel request denied by a rule 00-kmodd.conf renders
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m is not None, line
        labels = frozenset(_LABEL.findall(m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def promtool() -> Path:
    if PROMTOOL.exists():
        return PROMTOOL
    found = shutil.which("promtool")
    if found is not None:
        return Path(found)
    if IN_CI:
        pytest.fail("promtool missing in CI: `make promtool` should have fetched it")
    pytest.skip("promtool missing: run `make promtool` (Debian's prometheus package)")


def check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(promtool()), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


SNAPSHOT = Snapshot(
    now=1000.5,
    started=900.0,
    generation=GenerationMetric(3, "abc", "def", "enforce", 990.25),
    decisions=(
        DecisionCount("deny", "copy-fail", "kernel", ("helper", "modprobe_d"), 2),
        DecisionCount("deny", 'odd"rule\\', "udev", (), 1),
        DecisionCount("allow", "default", "kernel", (), 5),
    ),
    invalid_names=1,
    no_generation=0,
    rules=(RuleMetric("copy-fail", True, 0), RuleMetric("r2", False, 2)),
    loaded_denied=(("algif_aead", "copy-fail"),),
    layers=(("kernel", False), ("helper", True)),
    journal_dropped=4,
    journal_failed=0,
    reloads_ok=2,
    reloads_failed=1,
    last_reload_ok=False,
)


def test_the_renderer_says_what_the_snapshot_holds() -> None:
    s = parse(render(SNAPSHOT))
    deny = {"outcome": "deny", "rule": "copy-fail", "source": "kernel"}
    assert value(s, "kmodd_decisions_total", **deny, layers="helper,modprobe_d") == 2
    # An escaped label value reads back as the rule id; "none" marks an unheld deny.
    odd = {"rule": 'odd\\"rule\\\\', "source": "udev"}
    assert value(s, "kmodd_decisions_total", outcome="deny", **odd, layers="none") == 1
    assert value(s, "kmodd_unenforced_denies_total", **odd) == 1
    assert value(s, "kmodd_generation_age_seconds") == 10.25
    assert value(s, "kmodd_generation_info", hash="abc", policy_hash="def", mode="enforce") == 1
    assert value(s, "kmodd_rule_enforced", rule="r2") == 0
    assert value(s, "kmodd_loaded_denied_module", module="algif_aead", rule="copy-fail") == 1
    assert value(s, "kmodd_reloads_total", result="failed") == 1
    assert value(s, "kmodd_journal_dropped_records_total") == 4


def test_no_generation_leaves_its_families_out() -> None:
    empty = Snapshot(900.0, 900.0, None, (), 0, 3, (), (), (), 0, 0, 0, 1, False)
    text = render(empty)
    assert "kmodd_generation_active 0\n" in text
    assert "kmodd_generation_info" not in text
    assert "# TYPE kmodd_decisions_total" not in text  # no samples, no family
    assert value(parse(text), "kmodd_no_generation_requests_total") == 3


def test_promtool_accepts_the_renderer() -> None:
    proc = check_metrics(render(SNAPSHOT))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_catches_a_broken_file() -> None:
    """So that the checks above could fail: a counter without _total is refused."""
    bad = render(SNAPSHOT).replace("kmodd_reloads_total", "kmodd_reloads")
    proc = check_metrics(bad)
    assert proc.returncode != 0
    assert "kmodd_reloads" in proc.stdout + proc.stderr


# --- the real daemon --------------------------------------------------------------------


@pytest.fixture
def daemon(kernel_tree: KernelTree) -> Iterator[tuple[SystemRoot, Daemon, Path]]:
    sr = make_root(kernel_tree)
    (sr.root / "proc").mkdir()
    (sr.root / "proc/modules").write_text(
        "algif_aead 20480 0 - Live 0x0000000000000000\nvfat 24576 1 - Live 0x0\n"
    )
    textfile = sr.root.parent / "node-exporter"
    textfile.mkdir()
    path = textfile / "kmodd.prom"
    extra = ["--no-watch", "--metrics-file", str(path), "--metrics-interval", "1"]
    d = Daemon(sr, extra=extra)
    yield sr, d, path
    if d.proc is not None:
        d.stop()
    shutil.rmtree(sr.root.parent, ignore_errors=True)


def _reload(sr: SystemRoot) -> int:
    cmd = [str(REPO / ".venv/bin/python"), "-m", "kmodd.cli.main", "--root", str(sr.root)]
    cmd += ["--runtime-dir", str(sr.runtime), "reload"]
    return subprocess.run(cmd, capture_output=True, timeout=200, check=False).returncode


def _wait(path: Path, predicate: object, timeout: float = 60.0) -> Samples:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while True:
        s = parse(path.read_text()) if path.exists() else {}
        if predicate(s) or time.monotonic() > deadline:
            return s
        time.sleep(0.2)


@root_required
@pytest.mark.root
def test_the_daemons_file_after_real_decisions(
    daemon: tuple[SystemRoot, Daemon, Path],
) -> None:
    sr, d, path = daemon
    d.start()
    assert path.exists()  # written with the first generation
    for _ in range(2):
        assert run_helper(sr, "-q", "--", "algif-aead") == (1, None)
    assert run_helper(sr, "-q", "--", "fs-vfat")[0] == 0
    assert _reload(sr) == 0  # a new generation: the file is rewritten now
    sr.write_policy(BASE_POLICY + "  - id: broken\n    action: maybe\n")
    assert _reload(sr) == 1  # a failed reload: rewritten too, the old generation stays
    s = parse(path.read_text())
    doc = d.status()
    gen = doc["generation"]
    deny = {"outcome": "deny", "rule": "copy-fail", "source": "kernel"}
    assert value(s, "kmodd_decisions_total", **deny, layers=HELD) == 2
    allow = {"outcome": "allow", "rule": "default", "source": "kernel", "layers": "none"}
    assert value(s, "kmodd_decisions_total", **allow) == 1
    assert value(s, "kmodd_generation") == gen["number"]
    info = {"hash": gen["hash"], "policy_hash": gen["policy_hash"], "mode": "enforce"}
    assert value(s, "kmodd_generation_info", **info) == 1
    assert value(s, "kmodd_reloads_total", result="ok") == 2
    assert value(s, "kmodd_reloads_total", result="failed") == 1
    assert value(s, "kmodd_last_reload_success") == 0
    assert value(s, "kmodd_loaded_denied_modules") == 1
    assert value(s, "kmodd_loaded_denied_module", module="algif_aead", rule="copy-fail") == 1
    cov = {c["rule"]: c["enforced"] for c in doc["coverage"]}
    assert value(s, "kmodd_rule_enforced", rule="copy-fail") == cov["copy-fail"]
    for name, layer in doc["layers"].items():
        assert value(s, "kmodd_layer_active", layer=name) == layer["active"]
    assert value(s, "kmodd_journal_dropped_records_total") == doc["journal"]["dropped"]
    proc = check_metrics(path.read_text())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # node_exporter is not root
    assert sorted(p.name for p in path.parent.iterdir()) == ["kmodd.prom"]  # no temp left
    # On its schedule (no reload now): the next decision shows up in a later write.
    assert run_helper(sr, "-q", "--", "algif-aead") == (1, None)
    later = _wait(path, lambda x: value(x, "kmodd_decisions_total", **deny, layers=HELD) == 3)
    assert value(later, "kmodd_decisions_total", **deny, layers=HELD) == 3


# --- the writer, without a daemon -------------------------------------------------------


def _view(tmp_path: Path) -> CoreView:
    counters: DecisionCounters = {
        "verdicts": {},
        "rules": {},
        "sources": {},
        "invalid_names": 0,
        "no_generation": 2,
    }
    return CoreView(
        started=100.0,
        paths=make_paths(tmp_path, "6.1.0-test", tmp_path / "run"),
        generation=None,
        last_reload=None,
        decisions=counters,
        journal_dropped=0,
        journal_failed=0,
        server_overflows=0,
        notify_dropped=0,
        modprobe_managed=False,
        tamper=None,
        static_usermodehelper=None,
        devices=(),
        notes=(),
        udev=None,
        watcher=None,
        kernel=None,
        last_good=None,
        decide=lambda name, source: None,
    )


def test_a_failing_write_is_reported_once_and_then_recovers(tmp_path: Path) -> None:
    sent: list[Record] = []
    sink = JournalSink(sent.append)
    sink.start()
    target = tmp_path / "node-exporter/kmodd.prom"
    writer = MetricsWriter(target, sink, interval_s=0.0)
    view = _view(tmp_path)
    for _ in range(3):  # no such directory: three failed writes, one notice
        writer.reloaded(False, view)
    assert sink.flush()
    assert [r.message for r in sent] == [
        f"cannot write metrics to {target}: cannot use directory {target.parent}: "
        "No such file or directory\n  hint: it must be a real directory"
    ]
    assert (writer.errors, writer.writes) == (3, 0)
    target.parent.mkdir()
    writer.tick(lambda: view)
    s = parse(target.read_text())
    assert value(s, "kmodd_reloads_total", result="failed") == 3
    assert value(s, "kmodd_generation_active") == 0
    assert value(s, "kmodd_no_generation_requests_total") == 2
    sink.stop()
