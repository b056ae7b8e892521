"""Figures: a median with min/max over runs, optional goal, printed as `name: value`.

Every figure of `make bench` is built here so that the printed lines, the goal check and
the table in docs/benchmarks.md cannot disagree.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

T = TypeVar("T")


class Cmp(StrEnum):
    LE = "<="
    GE = ">="


@dataclass(frozen=True, slots=True)
class Goal:
    cmp: Cmp
    limit: float

    def met(self, value: float) -> bool:
        return value <= self.limit if self.cmp is Cmp.LE else value >= self.limit

    def __str__(self) -> str:
        return f"{self.cmp.value} {_number(self.limit)}"


@dataclass(frozen=True, slots=True)
class Figure:
    name: str
    value: float
    unit: str = ""
    low: float | None = None  # min over runs (None: a single value or a ratio)
    high: float | None = None
    runs: int = 1
    goal: Goal | None = None
    note: str = ""  # what the value is, in a few words (the doc's last column)

    @property
    def met(self) -> bool | None:
        return None if self.goal is None else self.goal.met(self.value)

    def line(self) -> str:
        text = f"{self.name}: {_number(self.value)}"
        if self.unit:
            text += f" {self.unit}"
        if self.low is not None and self.high is not None:
            text += f" (min {_number(self.low)}, max {_number(self.high)}, n={self.runs})"
        if self.goal is not None:
            text += f" [goal {self.goal}: {'met' if self.met else 'MISSED'}]"
        return text


def _number(value: float) -> str:
    if isinstance(value, int) or (value.is_integer() and abs(value) >= 100):
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def percentile(samples: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (p99 of 1,000 samples is the 990th smallest)."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(
    name: str,
    samples: Sequence[float],
    unit: str = "ms",
    *,
    goal: Goal | None = None,
    note: str = "",
) -> Figure:
    """The median of SAMPLES with their min and max."""
    return Figure(
        name,
        statistics.median(samples),
        unit,
        min(samples),
        max(samples),
        len(samples),
        goal,
        note,
    )


def ratio(name: str, num: Figure, den: Figure, *, goal: Goal | None = None) -> Figure:
    """NUM / DEN, both medians of the same run."""
    return Figure(name, num.value / den.value, "x", goal=goal, note=f"{num.name} / {den.name}")


def interleaved(jobs: dict[str, Callable[[], T]], runs: int, warmup: int = 2) -> dict[str, list[T]]:
    """Run every job once per round, RUNS rounds, after WARMUP discarded rounds.

    Round-robin rather than job after job: on a shared machine the load changes by the
    second, and a ratio is only fair if both sides saw the same load."""
    samples: dict[str, list[T]] = {name: [] for name in jobs}
    for round_no in range(warmup + runs):
        for name, job in jobs.items():
            value = job()
            if round_no >= warmup:
                samples[name].append(value)
    return samples
