"""The daemon's metrics in the Prometheus text format, for node_exporter's textfile
collector (docs/fleet.md): a pure function of a typed snapshot, no I/O here.

A root daemon opens no listening socket for this: kmodd writes the file
(daemon/metrics_writer.py) and node_exporter, which already runs on the fleet's hosts,
serves it.  Names follow the Prometheus conventions: the kmodd_ prefix, _total for
counters, base units in the name (_seconds), HELP and TYPE for every family, and labels
only from bounded sets (outcomes, sources, layers, the policy's own rule ids, module
names the policy denies); request names, which any user can choose, are never labels.
Counters count since the daemon started (Prometheus handles the reset on restart).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

Labels = tuple[tuple[str, str], ...]


class Kind(StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"


@dataclass(frozen=True, slots=True)
class DecisionCount:
    outcome: str  # allow, deny, would_deny
    rule: str
    source: str  # kernel, udev, cli
    layers: tuple[str, ...]  # the layers that enforce it (sorted); () for none
    count: int


@dataclass(frozen=True, slots=True)
class GenerationMetric:
    number: int
    hash: str
    policy_hash: str
    mode: str
    created: float  # wall clock, seconds


@dataclass(frozen=True, slots=True)
class RuleMetric:
    rule: str
    enforced: bool  # every deny of the rule is held by some layer (policy/coverage.py)
    gaps: int  # sentences of what is not enforced


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one metrics file says; built by the writer from the core's view."""

    now: float  # wall clock when taken
    started: float  # the daemon's start, wall clock
    generation: GenerationMetric | None
    decisions: tuple[DecisionCount, ...]
    invalid_names: int
    no_generation: int
    rules: tuple[RuleMetric, ...]
    loaded_denied: tuple[tuple[str, str], ...]  # (module, rule): loaded, yet denied
    layers: tuple[tuple[str, bool], ...]  # (layer, active)
    journal_dropped: int
    journal_failed: int
    reloads_ok: int
    reloads_failed: int
    last_reload_ok: bool | None  # None: no reload finished yet


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    kind: Kind
    help: str
    samples: tuple[tuple[Labels, float], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def render_family(f: Family) -> str:
    lines = [f"# HELP {f.name} {f.help}", f"# TYPE {f.name} {f.kind.value}"]
    for labels, value in f.samples:
        text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
        lines.append(
            f"{f.name}{{{text}}} {_number(value)}" if text else f"{f.name} {_number(value)}"
        )
    return "\n".join(lines) + "\n"


def _one(name: str, kind: Kind, help: str, value: float) -> Family:
    return Family(name, kind, help, (((), value),))


def _decisions(s: Snapshot) -> Iterable[Family]:
    def labels(d: DecisionCount) -> Labels:
        layers = ",".join(d.layers) or "none"
        return (("outcome", d.outcome), ("rule", d.rule), ("source", d.source), ("layers", layers))

    rows = sorted(s.decisions, key=lambda d: (d.outcome, d.rule, d.source, d.layers))
    yield Family(
        "kmodd_decisions_total",
        Kind.COUNTER,
        "Module-load decisions, by outcome, deciding rule, request source and the layers"
        ' that enforce them (layers="none": nothing holds it).',
        tuple((labels(d), d.count) for d in rows),
    )
    unheld: dict[tuple[str, str], int] = {}
    for d in rows:
        if d.outcome == "deny" and not d.layers:
            unheld[(d.rule, d.source)] = unheld.get((d.rule, d.source), 0) + d.count
    yield Family(
        "kmodd_unenforced_denies_total",
        Kind.COUNTER,
        "Deny decisions that no enforcing layer holds (the request could still load).",
        tuple(((("rule", r), ("source", src)), n) for (r, src), n in sorted(unheld.items())),
    )
    yield _one(
        "kmodd_invalid_requests_total",
        Kind.COUNTER,
        "Kernel requests denied because the name was not a valid module request.",
        s.invalid_names,
    )
    yield _one(
        "kmodd_no_generation_requests_total",
        Kind.COUNTER,
        "Kernel requests answered without a policy generation (the helper fell back).",
        s.no_generation,
    )


def _generation(s: Snapshot) -> Iterable[Family]:
    g = s.generation
    yield _one(
        "kmodd_generation_active",
        Kind.GAUGE,
        "1 if a policy generation is active, 0 if none is.",
        g is not None,
    )
    if g is None:
        return
    yield _one("kmodd_generation", Kind.GAUGE, "Number of the active policy generation.", g.number)
    info = (("hash", g.hash), ("policy_hash", g.policy_hash), ("mode", g.mode))
    yield Family(
        "kmodd_generation_info",
        Kind.GAUGE,
        "The active generation's hash, its policy's hash and its mode (value always 1).",
        ((info, 1),),
    )
    yield _one(
        "kmodd_generation_created_timestamp_seconds",
        Kind.GAUGE,
        "When the active generation was built (Unix time).",
        round(g.created, 3),
    )
    yield _one(
        "kmodd_generation_age_seconds",
        Kind.GAUGE,
        "Age of the active generation when this file was written.",
        round(max(0.0, s.now - g.created), 3),
    )


def _policy(s: Snapshot) -> Iterable[Family]:
    rules = sorted(s.rules, key=lambda r: r.rule)
    yield Family(
        "kmodd_rule_enforced",
        Kind.GAUGE,
        "1 if every deny of the rule is held by some enforcing layer, 0 if not (coverage).",
        tuple(((("rule", r.rule),), r.enforced) for r in rules),
    )
    yield Family(
        "kmodd_rule_coverage_gaps",
        Kind.GAUGE,
        "What the rule denies but no layer enforces, as counted gaps (kmodctl status).",
        tuple(((("rule", r.rule),), r.gaps) for r in rules),
    )
    yield _one(
        "kmodd_loaded_denied_modules",
        Kind.GAUGE,
        "Modules loaded now that the active policy denies.",
        len(s.loaded_denied),
    )
    yield Family(
        "kmodd_loaded_denied_module",
        Kind.GAUGE,
        "A module loaded now that the active policy denies, with the rule (value 1).",
        tuple(((("module", m), ("rule", r)), 1) for m, r in sorted(s.loaded_denied)),
    )
    yield Family(
        "kmodd_layer_active",
        Kind.GAUGE,
        "1 if the enforcing layer is active, 0 if not (kmodctl status layers).",
        tuple(((("layer", name),), on) for name, on in s.layers),
    )


def _health(s: Snapshot) -> Iterable[Family]:
    yield _one(
        "kmodd_start_time_seconds", Kind.GAUGE, "When the daemon started (Unix time).", s.started
    )
    yield _one(
        "kmodd_journal_dropped_records_total",
        Kind.COUNTER,
        "Journal records dropped because the send queue was full.",
        s.journal_dropped,
    )
    yield _one(
        "kmodd_journal_failed_records_total",
        Kind.COUNTER,
        "Journal records that journald refused or could not be sent.",
        s.journal_failed,
    )
    yield Family(
        "kmodd_reloads_total",
        Kind.COUNTER,
        "Policy reloads since the daemon started, by result (failed: the old one stayed).",
        (((("result", "ok"),), s.reloads_ok), ((("result", "failed"),), s.reloads_failed)),
    )
    if s.last_reload_ok is not None:
        yield _one(
            "kmodd_last_reload_success",
            Kind.GAUGE,
            "1 if the last reload activated its generation, 0 if it failed.",
            s.last_reload_ok,
        )


def families(s: Snapshot) -> Sequence[Family]:
    return (*_decisions(s), *_generation(s), *_policy(s), *_health(s))


def render(s: Snapshot) -> str:
    """The whole file; families without samples are left out (promtool warns on them)."""
    return "".join(render_family(f) for f in families(s) if f.samples)
