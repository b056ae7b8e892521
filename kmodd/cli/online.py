"""`kmodctl status` and `kmodctl reload`: the verbs that talk to the running daemon."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from kmodd import wire
from kmodd.cli import client
from kmodd.cli.common import print_json, wants_json
from kmodd.cli.verbs import Verb, VerbSpec
from kmodd.contract.status import KernelRuleInfo, StatusDocument, parse_status
from kmodd.errors import KmoddError
from kmodd.paths import MODULE_BASES, base_note, make_paths


def _reload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--accept-removed",
        action="append",
        default=[],
        metavar="DIR",
        help="drop policy dir DIR on purpose: without this, a generation that lost a dir"
        " the last good one had files in is refused (repeatable)",
    )


VERBS: tuple[VerbSpec, ...] = (
    VerbSpec(
        Verb.STATUS,
        "show the running daemon's generation, mode, counters and problems",
        "kmodd.cli.online:status",
        description="Ask the running kmodd for its state: pid, uptime, policy generation"
        " and hash, mode, policy files, last reload (with errors), decision counters,"
        " kernel.modprobe, the enforcing layers and which of them hold each deny rule (with"
        " what is left open and the remedy), whether the initramfs carries this policy,"
        " watcher and udev counters, enforcement file, conflicts, devices and loaded"
        " modules the policy denies.  Exit 1 when the daemon is not running.",
        epilog="examples:\n  kmodctl status\n  kmodctl status --json | jq .decisions",
    ),
    VerbSpec(
        Verb.RELOAD,
        "reload the policy now and wait for the result",
        "kmodd.cli.online:reload",
        add_arguments=_reload_arguments,
        description="Ask kmodd (root only) to build a new policy generation.  Waits until"
        " it is live; on failure prints every error (FILE:LINE:COL) and exits 1 while the"
        " daemon keeps the previous generation.",
        epilog="examples:\n  kmodctl reload\n  kmodctl reload --accept-removed /etc/kmodd/policy.d",
    ),
)


def _socket(args: argparse.Namespace) -> Any:
    # The control socket needs no kernel release: don't make --root pick one.
    return make_paths(args.root, args.kernel or "-", args.runtime_dir).control_socket


def _remote(err: wire.RemoteError) -> KmoddError:
    if err.name == wire.ErrorName.PERMISSION_DENIED:
        return KmoddError(err.message, hint="run as root")
    return KmoddError(f"kmodd: {err.message} ({err.name})")


def status(args: argparse.Namespace) -> int:
    try:
        doc = parse_status(client.call(_socket(args), wire.Method.STATUS))
    except wire.RemoteError as err:
        raise _remote(err) from None
    if wants_json(args):
        print_json(doc)
    else:
        sys.stdout.write(render_status(doc))
    return 0


def reload(args: argparse.Namespace) -> int:
    try:
        params = {"accept_removed": args.accept_removed} if args.accept_removed else None
        reply = client.call(
            _socket(args), wire.Method.RELOAD, params, timeout=client.RELOAD_TIMEOUT_S
        )
    except wire.RemoteError as err:
        if err.name != wire.ErrorName.RELOAD_FAILED:
            raise _remote(err) from None
        errors = [str(e) for e in err.parameters.get("errors", [])]
        kept = err.parameters.get("kept_generation")
        if wants_json(args):
            print_json({"ok": False, "errors": errors, "kept_generation": kept})
        for line in errors:
            print(line, file=sys.stderr)
        keeping = f"keeping generation {kept}" if kept is not None else "no generation is active"
        print(f"kmodctl: reload failed, {keeping}", file=sys.stderr)
        return 1
    if wants_json(args):
        print_json({"ok": True, **reply})
    else:
        print(f"reloaded: policy generation {reply['generation']} ({str(reply['hash'])[:12]})")
    return 0


# ---------------------------------------------------------------------------------------
# Human rendering of io.kmodd.Status


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    parts = (
        [f"{days}d"] * bool(days) + [f"{hours}h"] * bool(hours) + [f"{minutes}m"] * bool(minutes)
    )
    return " ".join([*parts, f"{s}s"])


def _counts(counter: dict[str, int]) -> str:
    items = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{k} {v}" for k, v in items) or "none"


def _generation_lines(doc: StatusDocument) -> list[str]:
    gen = doc.get("generation")
    if gen is None:
        return ["generation:  NONE (the helper decides from its last snapshot)"]
    mode = gen["mode"] + (" (set by the kernel command line)" if gen["mode_overridden"] else "")
    lines = [
        f"generation:  {gen['number']}  hash {gen['hash'][:12]}",
        f"mode:        {mode}; default {gen['default']}; {gen['rules']} rule(s)",
    ]
    if gen.get("stands_in"):
        lines.append(f"POLICY INVALID: {gen['stands_in']}")
    files = gen["files"] or ["(none)"]
    lines += [f"policy:      {files[0]}"] + [f"             {f}" for f in files[1:]]
    return lines


def _reload_lines(doc: StatusDocument) -> list[str]:
    last = doc.get("last_reload")
    if last is None:
        return []
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["at"]))
    result = "ok" if last["ok"] else "FAILED"
    lines = [f"last reload: {result} at {when} ({last['cause']}, {last['duration_s']} s)"]
    lines += [f"  {e}" for e in last["errors"]]
    return lines


def _modprobe_line(doc: StatusDocument) -> str:
    km = doc["kernel_modprobe"]
    if not km["managed"]:
        return "kernel.modprobe: not managed by this daemon"
    if km["points_at_helper"]:
        return f"kernel.modprobe: {km['current']} (the kmodd helper)"
    return f"kernel.modprobe: {km['current']!r}, NOT the kmodd helper {km.get('expected')}"


def _last_good_lines(doc: StatusDocument) -> list[str]:
    lg = doc.get("last_good")
    if lg is None:
        return []
    if lg["fallback"] is not None:
        return [f"last good:   ENFORCING IT: {lg['fallback']['message']}"]
    stored = lg["stored"]
    line = "none" if stored is None else f"generation {stored['generation']} in {lg['store']}"
    notes = (lg["refused"], lg["persist_note"], lg["boot_published"])
    return [f"last good:   {line}", *(f"  {note}" for note in notes if note)]


def _layer_lines(doc: StatusDocument) -> list[str]:
    layers = doc["layers"]
    return ["layers:"] + [
        f"  {name:<11} {'active' if state['active'] else 'INACTIVE'}: {state['reason']}"
        for name, state in layers.items()
    ]


def _coverage_lines(doc: StatusDocument) -> list[str]:
    """Which layers hold each deny rule; what is left open, with the remedy."""
    rules = doc.get("coverage") or []
    if not rules:
        return []
    open_ = [r for r in rules if not r["enforced"]]
    lines = [f"coverage:    {len(rules)} deny rule(s), {len(open_)} not fully enforced"]
    width = max(len(r["rule"]) for r in rules)
    for r in rules:
        held = " ".join(r["layers"]) or "NOTHING"
        lines.append(
            f"  {r['rule']:<{width}}  {held}{'' if r['enforced'] else '  (gaps)'}"
            + _kernel_note(r.get("kernel"))
        )
        lines += [f"    not enforced: {gap}" for gap in r["gaps"]]
        if r["remedy"] and not r["enforced"]:
            lines.append(f"    remedy: {r['remedy']}")
    return lines


def _kernel_note(k: KernelRuleInfo | None) -> str:
    """Which layer enforces it in-kernel: `kernel` is in the layers when active; say
    when it would be (layer inactive) or cannot be."""
    if k is None or k["enforcing"]:
        return ""
    return "  (kernel layer: would hold it if active)" if k["holds"] else "  (not in-kernel)"


def _initramfs_line(doc: StatusDocument) -> list[str]:
    info = doc.get("initramfs")
    gen = doc.get("generation")
    if info is None or gen is None:
        return []
    if info["path"] is None:
        return [f"initramfs:   none for {doc['release']} (nothing loads before kmodd from one)"]
    if info["error"]:
        return [f"initramfs:   {info['path']}: NOT CHECKED ({info['error']})"]
    if info["current"]:
        return [f"initramfs:   {info['path']}: carries this policy ({gen['policy_hash'][:12]})"]
    found = (info["policy_hash"] or "no kmodd record")[:12]
    return [
        f"initramfs:   {info['path']}: PREDATES THE POLICY (it has {found}, the policy is"
        f" {gen['policy_hash'][:12]}): rebuild it (update-initramfs -u, or dracut -f)"
    ]


def _edges_lines(doc: StatusDocument) -> list[str]:
    w, u = doc["watcher"], doc["udev"]
    watcher = "off" if w is None else f"{w['errors']} failed round(s)"
    udev = (
        "no monitor"
        if u is None
        else f"{u['events']} event(s) ({u['source']}), {u['skipped']} skipped,"
        f" {u['lost']} monitor failure(s)"
    )
    return [f"watcher:     {watcher}", f"udev:        {udev}"]


def _modules_line(doc: StatusDocument) -> str:
    """Which module tree the daemon reads: a merged-/usr root has only usr/lib/modules."""
    base = doc.get("module_dir_base", MODULE_BASES[0])  # an older daemon does not say
    return f"modules:     {doc.get('module_dir', '?')}{base_note(base)}"


def render_status(doc: StatusDocument) -> str:
    d = doc["decisions"]
    lines = [
        f"kmodd:       running, pid {doc['pid']}, up {_duration(doc['uptime_s'])}",
        *_generation_lines(doc),
        *_reload_lines(doc),
        *_last_good_lines(doc),
        f"decisions:   {_counts(d['verdicts'])}",
        f"  by rule:   {_counts(d['rules'])}",
        f"  by source: {_counts(d['sources'])}",
        f"journal:     {doc['journal']['dropped']} record(s) dropped",
        _modprobe_line(doc),
        *_edges_lines(doc),
        f"enforcement: {doc['enforcement_file']}",
        _modules_line(doc),
        *_layer_lines(doc),
        *_coverage_lines(doc),
        *_initramfs_line(doc),
    ]
    sections = (
        ("conflicts", doc["conflicts"], lambda c: f"{c['kind']} {c['module']}: {c['detail']}"),
        (
            "devices needing denied modules",
            doc["devices_denied"],
            lambda x: f"{x['devpath']} ({' '.join(x['modules'])}; rule {x['rule']})",
        ),
        (
            "loaded modules the policy denies",
            doc["loaded_denied"],
            lambda x: f"{x['module']} (rule {x['rule']})",
        ),
        ("notes", doc["notes"], str),
    )
    for title, items, show in sections:
        lines.append(f"{title}: {'none' if not items else len(items)}")
        lines += [f"  {show(item)}" for item in items]
    return "\n".join(lines) + "\n"
