"""`make demo`: boot Debian's kernel with kmodd as its modprobe helper and show decisions.

One boot (tests/vm/scenarios.py, plan `demo`): the files `kmodctl install` writes, the
sysctl drop-in pointing kernel.modprobe at the helper, a journald and the daemon with its
kernel layer (BPF LSM) and the shipped baseline; then autoloads, allowed and denied (one
from an unprivileged user), a root `modprobe` and an `insmod` by path of a denied module.
For every ask: which layer decided (the kernel layer, the helper, modprobe.d), how often the
helper ran (the daemon's count of its queries), what kmodd decided and why, what the kernel
did; then the journal lines and `kmodctl status`.
"""

from __future__ import annotations

import errno
import sys
import time
from typing import Any

from tests.kerneltree import KernelTreeError, ensure_kernel_tree
from tests.vm.harness import VMError, VMResult, boot_plan

WIDTH = 78


def say(text: str = "") -> None:
    print(text, flush=True)


def rule(title: str) -> None:
    say()
    say(f"== {title} " + "=" * max(0, WIDTH - len(title) - 4))


def progress(line: str) -> None:
    """Echo the guest's step markers while it runs (the boot is the slow part)."""
    if line.startswith("kmodd-vm:"):
        say("   " + line.rstrip())


def syscall_text(outcome: dict[str, Any]) -> str:
    if outcome.get("ok"):
        return "succeeded"
    if "errno" in outcome:  # a syscall's errno, or a command's stderr below
        code = outcome["errno"]
        return f"failed: {errno.errorcode.get(code, code)} ({code})"
    return f"failed: {outcome.get('stderr') or outcome}"  # insmod: "Operation not permitted"


def _kmodd(records: list[dict[str, Any]], request: str) -> list[dict[str, Any]]:
    return [
        r
        for r in records
        if r.get("SYSLOG_IDENTIFIER") == "kmodd" and r.get("KMODD_REQUEST") == request
    ]


def helper_runs(ask: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """How often the helper ran for ASK's request (the daemon journals each of its
    queries; an in-kernel refusal is journaled as `in-kernel: ...` and ran no helper),
    and how many helper queries the daemon counted during the whole step."""
    mine = [r for r in _kmodd(records, ask["request"]) if r.get("KMODD_LAYERS") != "kernel"]
    total = ask.get("helper_runs")
    during = "?" if total is None else str(total)
    return f"helper runs for it: {len(mine)}, during the step: {during}"


def decided_by(ask: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """Which layer decided ASK, from the journal and the helper-run count."""
    request = ask["request"]
    ran = helper_runs(ask, records) if request is not None else ""
    if request is None:
        if ask["what"].startswith("insmod"):
            hit = any("kernel layer refused loading" in str(r.get("MESSAGE")) for r in records)
            return (
                "kernel layer (BPF LSM kernel_read_file: the file's identity is denied)"
                if hit and not ask["syscall"].get("ok")
                else "no layer refused it"
            )
        return "modprobe.d (00-kmodd.conf: kmod runs the deny stub; no kernel request)"
    found = _kmodd(records, request)
    if any(r.get("KMODD_LAYERS") == "kernel" for r in found):
        return f"kernel layer (BPF LSM kernel_module_request, before any helper)\n         {ran}"
    if found:
        return f"the helper (kmodd-modprobe asked the daemon)\n         {ran}"
    return f"no kmodd record ({ran})"


def decision_text(records: list[dict[str, Any]], request: str | None) -> list[str]:
    lines = []
    for r in [] if request is None else _kmodd(records, request):
        lines.append(
            f"kmodd:   {r.get('KMODD_VERDICT', '?').upper()} by rule "
            f"{r.get('KMODD_RULE')} (mode {r.get('KMODD_MODE')}, "
            f"generation {r.get('KMODD_POLICY_GENERATION')})"
        )
        lines.append(f"         load set: {r.get('KMODD_MODULES', '')}")
        lines.append(f"         why: {r.get('KMODD_REASON', '')}")
    return lines


def show_asks(data: dict[str, Any]) -> None:
    records = data["journal"]
    modules = set(data["modules"])
    for ask in data["asks"]:
        rule(f"{ask['who']}: {ask['what']}")
        if ask["request"]:
            say(f'kernel:  request_module("{ask["request"]}")')
        say(f"decided: {decided_by(ask, records)}")
        for line in decision_text(records, ask["request"]):
            say(line)
        say(f"result:  {syscall_text(ask['syscall'])}  ({ask.get('took_s', '?')} s)")
    rule("what the kernel has loaded now (of the modules asked for)")
    for name in ("af_key", "xfrm_algo", "algif_aead", "hfsplus"):
        say(f"  {name:12} {'loaded' if name in modules else 'not loaded'}")
    rule("layers (kmodctl status --json: layers)")
    for name, state in (data.get("layers") or {}).items():
        say(f"  {name:10} {'active' if state['active'] else 'INACTIVE'}: {state['reason']}")


def show_journal(records: list[dict[str, Any]]) -> None:
    rule("journalctl -t kmodd -t kmodd-modprobe")
    for r in records:
        stamp = time.strftime("%H:%M:%S", time.gmtime(int(r.get("__REALTIME_TIMESTAMP", 0)) / 1e6))
        fields = " ".join(
            f"{k}={r[k]}" for k in ("KMODD_VERDICT", "KMODD_RULE", "KMODD_SOURCE") if k in r
        )
        say(f"{stamp} {r.get('SYSLOG_IDENTIFIER')}: {r.get('MESSAGE')}  {fields}".rstrip())


def report(run: VMResult) -> int:
    setup = run.results.get("setup", {})
    demo = run.results.get("demo", {})
    if not setup.get("ok") or not demo.get("ok"):
        say(run.tail(80))
        say(setup.get("error") or demo.get("error") or "the guest wrote no results")
        return 1
    data = setup["data"]
    rule("set-up inside the VM")
    say(f"kernel.modprobe = {data['kernel_modprobe']}  (sysctl drop-in from kmodctl install)")
    say(f"kmodd ready after {data['start_s']} s with the shipped baseline policy")
    say(f"the asks below took {demo['data'].get('steps_s', '?')} s (TCG guest)")
    show_asks(demo["data"])
    show_journal(demo["data"]["journal"])
    rule("kmodctl status")
    say(demo["data"]["status_text"].rstrip())
    return 0


def main() -> int:
    try:
        tree = ensure_kernel_tree()
    except KernelTreeError as err:
        say(f"demo: no kernel tree: {err}")
        return 1
    say(f"Booting Debian's kernel {tree.release} under qemu (TCG, no KVM here) with kmodd")
    say("as its modprobe helper; this machine's userspace is shared read-only.")
    started = time.monotonic()
    try:
        run = boot_plan("demo", timeout_s=900, echo=progress)
    except VMError as err:
        say(f"demo: {err}")
        return 1
    status = report(run)
    say()
    say(f"(whole demo: {time.monotonic() - started:.0f} s, VM exit status {run.returncode})")
    return status


if __name__ == "__main__":
    sys.exit(main())
