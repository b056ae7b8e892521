"""`kmodctl verify` output: the auditor's table, the JSON document, the verb's handler."""

from __future__ import annotations

import argparse
from pathlib import Path

from kmodd.cli.common import paths_from_args, print_json, wants_json
from kmodd.cli.validate import load_for
from kmodd.cli.verify import DryRun, Report, Row, build_report
from kmodd.paths import Paths
from kmodd.policy.engine import compile_policy, mode_override
from kmodd.policy.types import Mode

COLUMNS = (
    "MODULE",
    "RULE",
    "KERNEL REQUEST",
    "KERNEL LAYER",
    "MODPROBE",
    "LOADED",
    "INITRAMFS",
    "BUILT-IN",
    "CIS",
    "ENFORCED",
)


def _kernel_cell(row: Row, report: Report) -> str:
    if row.builtin:
        return "built-in"
    if not row.expect_kernel:
        return "not denied"  # the rule does not apply to kernel requests
    if report.kernel_layer.active and "request" in row.in_kernel:
        return "refused (kernel layer)"  # before any helper runs
    if report.kernel.modprobe_path is None:
        return "?"
    if row.kernel is None:
        return "refused (modprobe.d)" if row.dry.refuses(row.module) else "LOADS"
    return "refused (helper)" if row.kernel else "LOADS"


def _kernel_layer_cell(row: Row, report: Report) -> str:
    """What the BPF LSM program refuses of ROW ("request+file"), or would if active."""
    if row.builtin:
        return "built-in"
    if not row.in_kernel:
        return "-"
    held = "+".join(row.in_kernel)
    return f"refuses {held}" if report.kernel_layer.active else f"would: {held}"


def _dry_cell(dry: DryRun | None, module: str, expected: bool = True) -> str:
    if dry is None:
        return "?"
    if dry.rc is None:
        return "timeout"
    if dry.refuses(module):
        return "refused"
    if dry.rc != 0:
        return f"error ({dry.rc})"
    return "LOADS" if expected else "loads (not denied)"


def _image_cell(row: Row) -> str:
    if row.in_image is None:
        return "?"
    if not row.in_image:
        return "absent"
    return _dry_cell(row.image_dry, row.module)


def _yes_no(value: bool | None) -> str:
    return "?" if value is None else ("yes" if value else "no")


def cells(row: Row, report: Report) -> tuple[str, ...]:
    return (
        row.module,
        row.rule,
        _kernel_cell(row, report),
        _kernel_layer_cell(row, report),
        "built-in" if row.builtin else _dry_cell(row.dry, row.module, row.expect_modprobe),
        _yes_no(row.loaded),
        _image_cell(row),
        _yes_no(row.builtin),
        "pass" if row.cis else "fail",
        "yes" if row.enforced else "NO",
    )


def render_text(report: Report) -> str:
    out = _header(report)
    table = [COLUMNS, *(cells(row, report) for row in report.rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    out += [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table
    ]
    bad = [r for r in report.rows if not r.enforced]
    out.append("")
    out.append(
        f"{len(report.rows)} denied module(s): {len(report.rows) - len(bad)} enforced,"
        f" {len(bad)} not enforced"
    )
    for row in bad:
        out.extend(f"  {row.module}: {problem}" for problem in row.problems)
    out.extend(f"warning: {note}" for note in report.notes)
    return "\n".join(out)


def _header(report: Report) -> list[str]:
    policy = report.policy
    kernel = report.kernel
    where = kernel.modprobe_path or "(not a live system)"
    if kernel.is_helper:
        snap = kernel.snapshot_generation or "none"
        where += f" = the kmodd helper; snapshot generation {snap} ({kernel.snapshot_mode})"
    image = report.initramfs
    if image.error:
        image_line = f"not checked ({image.error})"
    else:
        kinds = "+".join(image.segments) or "empty"
        if image.policy_hash is None:
            state = "no kmodd record"
        elif image.policy_hash == policy.hash:
            state = f"policy {image.policy_hash[:12]}, current"
        else:
            state = f"policy {image.policy_hash[:12]}, PREDATES THE POLICY"
        image_line = f"{image.path} ({kinds}; {image.reader}): {state}"
    return [
        f"policy {policy.hash[:12] or '-'} (mode {policy.mode}, {len(policy.files)} file(s)),"
        f" kernel {report.release}, root {report.root}",
        f"kernel.modprobe: {where}",
        f"kernel layer: {report.kernel_layer.word}: {report.kernel_layer.reason}"
        + ("" if report.kernel_layer.active else " (KERNEL LAYER shows what it would refuse)"),
        f"modprobe: {report.modprobe} -n -v, config " + " ".join(report.config_dirs),
        f"initramfs: {image_line}",
        "",
    ]


def _dry_json(dry: DryRun | None) -> dict[str, object] | None:
    if dry is None:
        return None
    return {"argv": list(dry.argv), "rc": dry.rc, "output": list(dry.lines), "error": dry.error}


def row_json(row: Row, report: Report) -> dict[str, object]:
    return {
        "module": row.module,
        "rule": row.rule,
        "denied_for": [
            s for s, on in (("kernel", row.expect_kernel), ("udev", row.expect_modprobe)) if on
        ],
        "kernel_request": _kernel_cell(row, report),
        "kernel_layer": {
            "holds": list(row.in_kernel),
            "enforcing": bool(row.in_kernel) and bool(report.kernel_layer.active),
        },
        "modprobe": {"refused": row.dry.refuses(row.module), **(_dry_json(row.dry) or {})},
        "loaded": row.loaded,
        "builtin": row.builtin,
        "initramfs": {
            "carries": row.in_image,
            "refused": None if row.image_dry is None else row.image_dry.refuses(row.module),
            "dry_run": _dry_json(row.image_dry),
        },
        "cis": {
            "install_shown": row.dry.shows_install(),
            "blacklisted": row.blacklisted,
            "pass": row.cis,
        },
        "enforced": row.enforced,
        "problems": list(row.problems),
    }


def to_json(report: Report) -> dict[str, object]:
    image = report.initramfs
    kernel = report.kernel
    bad = sum(1 for r in report.rows if not r.enforced)
    return {
        "root": report.root,
        "release": report.release,
        "policy": {"hash": report.policy.hash, "mode": str(report.policy.mode)},
        "kernel_modprobe": {
            "path": kernel.modprobe_path,
            "is_helper": kernel.is_helper,
            "snapshot_generation": kernel.snapshot_generation,
            "snapshot_mode": kernel.snapshot_mode,
        },
        "modprobe": {"path": report.modprobe, "config_dirs": list(report.config_dirs)},
        "kernel_layer": {
            "state": report.kernel_layer.word,
            "active": report.kernel_layer.active,
            "reason": report.kernel_layer.reason,
        },
        "rendered_policy_hash": report.rendered_hash,
        "initramfs": {
            "path": image.path,
            "error": image.error,
            "reader": image.reader,
            "segments": list(image.segments),
            "policy_hash": image.policy_hash,
            "current": image.policy_hash == report.policy.hash,
        },
        "modules": [row_json(row, report) for row in report.rows],
        "summary": {
            "denied": len(report.rows),
            "enforced": len(report.rows) - bad,
            "not_enforced": bad,
        },
        "warnings": list(report.notes),
        "ok": not report.failed and report.policy.mode is Mode.ENFORCE,
    }


def _cmdline_mode(paths: Paths) -> Mode | None:
    """kmodd.mode= on the live kernel command line, as the daemon honours it."""
    if str(paths.root) != "/":
        return None
    try:
        return mode_override(Path("/proc/cmdline").read_text(errors="replace"))
    except OSError:
        return None


def run(args: argparse.Namespace) -> int:
    paths = paths_from_args(args)
    if args.runtime_dir is None and str(paths.root) != "/":
        from dataclasses import replace  # noqa: PLC0415 -- one use

        paths = replace(paths, runtime_dir=paths.root / "run/kmodd")
    policy = compile_policy(load_for(args, args.policy), mode=_cmdline_mode(paths))
    report = build_report(paths, policy, args.module or ())
    doc = to_json(report)
    if wants_json(args):
        print_json(doc)
    else:
        print(render_text(report))
    return 0 if doc["ok"] else 1
