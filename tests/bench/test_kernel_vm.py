"""bench.kernel_vm turns one VM boot's step results into figures (no VM here: the boot is
`make bench`'s; what is tested is the arithmetic and that a failed step is named)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.kernel_vm import figures


def results(**over: Any) -> dict[str, Any]:
    steps: dict[str, Any] = {
        "setup": {"start_s": 420.5},
        "latency": {
            "kernel_ns": [1_000_000, 2_000_000, 3_000_000],
            "helper_ns": [200_000_000, 100_000_000, 300_000_000],
            "helper_verdicts": ["deny"],
        },
        "cpu": {
            "kernel": {"requests": 200, "records": 200, "cpu_s": 3.0, "wall_s": 20.0},
            "idle": {"cpu_s": 1.0, "wall_s": 20.0},
            "helper": {"requests": 40, "records": 40, "cpu_s": 2.5, "wall_s": 10.0},
            "ticks_per_s": 100,
        },
    }
    steps.update(over)
    return {"results": {name: {"ok": True, "data": data} for name, data in steps.items()}}


def test_figures_are_medians_ratios_and_cpu_minus_the_idle_baseline() -> None:
    got = {f.name: f for f in figures(results())}
    assert got["kernel_deny_ms"].value == 2.0
    assert got["helper_deny_ms_vm"].value == 200.0
    assert got["helper_vs_kernel_deny"].value == 100.0
    # (3.0 - 1.0) s over 200 events; the helper's idle share is scaled to its 10 s
    assert got["daemon_cpu_us_per_kernel_event"].value == pytest.approx(10_000.0)
    assert got["daemon_cpu_us_per_helper_request"].value == pytest.approx(50_000.0)
    assert got["helper_vs_kernel_daemon_cpu"].value == pytest.approx(5.0)
    assert "deny" in got["helper_deny_ms_vm"].note


def test_a_failed_step_is_named() -> None:
    doc = results()
    doc["results"]["cpu"] = {"ok": False, "error": "daemon gone"}
    with pytest.raises(RuntimeError, match="VM step cpu: daemon gone"):
        figures(doc)
