"""`kmodctl explain NAME`: resolution, load set, verdict and why, offline.

Exit 0 when the policy allows NAME, 1 when it denies it (also in permissive mode: the
exit code says what the policy says; `effective` in the JSON says what would happen).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from kmodd import helper
from kmodd.bpf.detect import detect
from kmodd.cli.common import paths_from_args, print_json, wants_json
from kmodd.cli.enforcement import (
    DecisionEnforcement,
    decision_json,
    explain_lines,
    kernel_state,
    of_decision,
)
from kmodd.cli.validate import load_for
from kmodd.errors import KmoddError
from kmodd.host.cmdline import read_mode_override
from kmodd.kmod.context import KmodContext
from kmodd.kmod.model import ConfigLine, LoadStep, ModuleInfo
from kmodd.kmod.provenance import Provenance
from kmodd.paths import Paths, base_note
from kmodd.policy.engine import Decision, Request, compile_policy, decide
from kmodd.policy.model import PolicySet, RequesterMatch
from kmodd.policy.types import Mode, Source, Verdict


@dataclass(frozen=True, slots=True)
class Explanation:
    decision: Decision
    policy: PolicySet
    infos: dict[str, ModuleInfo]
    provenance: tuple[ConfigLine, ...]
    mode_from: str | None  # where the effective mode came from
    valid_kernel_name: bool
    steps: tuple[LoadStep, ...]
    module_dir: str
    module_dir_base: str  # lib/modules, or usr/lib/modules for a merged-/usr root
    enforcement: DecisionEnforcement


def _cmdline_mode(root: Path) -> Mode | None:
    """kmodd.mode= on the kernel command line: only meaningful for the live root."""
    return read_mode_override() if root == Path("/") else None


def _provenance(paths: Paths, request: str, modules: list[str]) -> tuple[ConfigLine, ...]:
    """modprobe.d lines relevant to REQUEST and MODULES, with file:line (kmodd.kmod.provenance;
    libkmod cannot locate lines)."""
    reader = Provenance.from_paths(paths)
    return tuple(reader.for_request(request, list(dict.fromkeys(modules))))


def explain(paths: Paths, name: str, source: Source, policy: PolicySet) -> Explanation:
    override = _cmdline_mode(paths.root)
    compiled = compile_policy(policy, mode=override)
    with KmodContext.from_paths(paths) as ctx:
        resolution = ctx.resolve(name)
        decision = decide(Request(name, source), resolution, compiled)
        enforcement = of_decision(compiled, ctx, decision, kernel_state(paths))
        infos: dict[str, ModuleInfo] = {}
        for module in dict.fromkeys((*resolution.modules, *resolution.load_set)):
            try:
                infos[module] = ctx.module_info(module)
            except KmoddError:
                continue  # an install-command-only name has no modinfo
    provenance = _provenance(paths, name, [*resolution.modules, *resolution.load_set])
    mode_from = "kernel command line" if override else policy.mode_from
    return Explanation(
        decision=decision,
        policy=policy,
        infos=infos,
        provenance=provenance,
        mode_from=mode_from,
        valid_kernel_name=helper.valid_name(name.encode(errors="replace")),
        steps=resolution.steps,
        module_dir=str(paths.module_dir.absolute()),
        module_dir_base=paths.module_base,
        enforcement=enforcement,
    )


def to_json(ex: Explanation) -> dict[str, object]:
    d = ex.decision
    info = d.rule_info
    return {
        "request": d.request,
        "source": str(d.source),
        "class": str(d.request_class),
        "modules": list(d.modules),
        "load_set": list(d.load_set),
        "verdict": str(d.verdict),
        "effective": str(d.effective),
        "mode": str(d.mode),
        "rule": d.rule,
        "reason": d.reason,
        "module": d.module,
        "rule_location": info.location if info else None,
        "references": list(info.references) if info else [],
        "steps": [
            {
                "module": s.module,
                "kind": str(s.kind),
                "path": s.path,
                "command": s.command,
                "options": s.options,
                "description": _description(ex.infos.get(s.module)),
            }
            for s in ex.steps
        ],
        "trace": [
            {"module": t.module, "rule": t.rule, "verdict": str(t.verdict), "via": t.via}
            for t in d.trace
        ],
        "provenance": [
            {"path": p.path, "line": p.line, "directive": p.directive, "text": p.text}
            for p in ex.provenance
        ],
        "valid_kernel_name": ex.valid_kernel_name,
        "module_dir": ex.module_dir,
        "module_dir_base": ex.module_dir_base,
        "policy": {
            "hash": ex.policy.hash,
            "files": [f.path for f in ex.policy.files],
            "mode_from": ex.mode_from,
        },
        "requester": requester(ex.policy),
        "enforcement": decision_json(ex.enforcement),
    }


def requester(policy: PolicySet) -> dict[str, object]:
    """The rules that test the requester, where each is decided and what decides them
    when the requester is unknown (explain has none: `unknown_requester` decides here)."""
    rules = [r.rule for r in policy.rules if r.rule.match.requester is not None]
    layer1 = [r.id for r in rules if not _in_kernel(r.match.requester)]
    support = detect()
    return {
        "rules": [r.id for r in rules],
        "unknown_requester": str(policy.unknown_requester),
        "unknown_requester_from": policy.unknown_requester_from,
        "in_kernel": bool(rules) and not layer1,
        "layer1_only": layer1,
        "kernel_layer": {"active": support.active, "reason": support.reason},
    }


def _in_kernel(match: RequesterMatch | None) -> bool:
    return match is None or (match.gid is None and match.unit is None and match.container is None)


def _requester_lines(ex: Explanation) -> list[str]:
    found = requester(ex.policy)
    rules = found["rules"]
    if not isinstance(rules, list) or not rules:
        return []
    layer = found["kernel_layer"]
    assert isinstance(layer, dict)
    state = "active" if layer["active"] else f"inactive: {layer['reason']}"
    where = found["unknown_requester_from"] or "the default"
    lines = [f"  requester rules: {', '.join(rules)}"]
    if found["in_kernel"]:
        lines.append(f"    decided in-kernel for the exact requester (kernel layer here: {state})")
    else:
        lines.append(
            f"    not decidable in-kernel: {found['layer1_only']}"
            " test gid, unit or container (layer 1 only)"
        )
    lines.append(
        f"    requester unknown (no kernel layer; explain has none): "
        f"unknown_requester {found['unknown_requester']} (from {where})"
    )
    return lines


def _description(info: ModuleInfo | None) -> str | None:
    if info is None or info.description is None:
        return None
    return " ".join(info.description.split())


def render_text(ex: Explanation) -> str:
    d = ex.decision
    out = [f"{d.request}  (class {d.request_class}, source {d.source})"]
    if not ex.valid_kernel_name:
        out.append("  note: the kernel never sends this name (not 1-55 printable bytes)")
    out.append(f"  resolves to: {' '.join(d.modules) if d.modules else '(nothing)'}")
    out.append(f"  modules: {ex.module_dir}{base_note(ex.module_dir_base)}")
    out.append("  load set (modprobe -D order):" if ex.steps else "  load set: (empty)")
    width = max((len(s.module) for s in ex.steps), default=0)
    for step in ex.steps:
        what = step.command or _short_path(step.path, ex.module_dir) or ""
        desc = _description(ex.infos.get(step.module))
        line = f"    {step.kind!s:<8} {step.module:<{width}}  {what}"
        out.append(line.rstrip() + (f"  ({desc})" if desc else ""))
    out.append(_verdict_line(d))
    info = d.rule_info
    where = f"  ({info.location})" if info and info.location else ""
    out.append(f"  rule: {d.rule}{where}")
    out.append(f"  reason: {d.reason}")
    for ref in info.references if info else ():
        out.append(f"  reference: {ref}")
    out.extend(explain_lines(ex.enforcement))
    out.append("  considered:")
    for considered in d.trace:
        subject = considered.module or f"(request {d.request})"
        verdict, rule, via = considered.verdict, considered.rule, considered.via
        out.append(f"    {subject:<{max(width, 10)}}  {verdict:<5}  {rule} ({via})")
    if ex.provenance:
        out.append("  modprobe.d:")
        out.extend(f"    {p.location()}  {p.text}" for p in ex.provenance)
    files = len(ex.policy.files)
    out.append(f"  policy: {files} file(s), generation {ex.policy.hash[:12] or '-'}")
    out.extend(_requester_lines(ex))
    return "\n".join(out)


def _short_path(path: str | None, module_dir: str) -> str | None:
    if path and path.startswith(module_dir + "/"):
        return path[len(module_dir) + 1 :]
    return path


def _verdict_line(d: Decision) -> str:
    mode = f"mode {d.mode}"
    if d.would_deny:
        return f"  verdict: DENY  ({mode}: would be denied, is allowed)"
    return f"  verdict: {d.verdict.upper()}  ({mode})"


def run(args: argparse.Namespace) -> int:
    paths = paths_from_args(args)
    policy = load_for(args, args.policy)
    ex = explain(paths, args.name, Source(args.source), policy)
    if wants_json(args):
        print_json(to_json(ex))
    else:
        print(render_text(ex))
    return 1 if ex.decision.verdict is Verdict.DENY else 0
