"""The kernel layer's figures, measured in the VM (tests/vm/bench_guest.py): one boot of
Debian's kernel under qemu, the daemon with its kernel layer and the MODHARDEN rules.

- `kernel_deny_ms` vs `helper_deny_ms_vm`: a request refused in-kernel against one the
  kernel passes to kmodd-modprobe, same boot, interleaved, timed in the requester.
- `daemon_cpu_us_per_kernel_event`: the daemon's CPU per ring-buffer event it journals
  (a deny), over N events, minus the same daemon idle for as long (baseline, same boot);
  against the daemon's CPU per helper-decided request.

The guest runs under TCG (no KVM here; docs/vm.md): absolute times are ~100x native for
Python, so the ratios are the figures to read.  The boot takes minutes (the daemon's first
generation build under TCG); `make bench` runs it, `python -m bench --no-vm` skips it.
KMODD_VM_WRAPPER (e.g. /work/coord/vmslot) prefixes the boot's command, so only the boot
holds a VM slot.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from typing import Any

from bench.stats import Figure, ratio, summary
from bench.system import REPO

WRAPPER_ENV = "KMODD_VM_WRAPPER"
BOOT_TIMEOUT_S = 2400  # the guest waits up to 1800 s for READY=1 (bench_guest.READY_S)


def boot_results() -> dict[str, Any]:
    """Boot once (in a child, behind the wrapper) and return the guest's step results."""
    wrapper = shlex.split(os.environ.get(WRAPPER_ENV, ""))
    argv = [*wrapper, sys.executable, "-m", "bench.kernel_vm"]
    proc = subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=BOOT_TIMEOUT_S + 600, check=False
    )
    try:
        doc: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": f"VM boot exited {proc.returncode}: {proc.stderr[-1500:]}"}
    return doc


def _step(doc: dict[str, Any], name: str) -> dict[str, Any]:
    step = doc.get("results", {}).get(name) or {}
    if not step.get("ok"):
        raise RuntimeError(f"VM step {name}: {step.get('error') or doc.get('error') or 'none'}")
    data: dict[str, Any] = step["data"]
    return data


def figures(doc: dict[str, Any]) -> list[Figure]:
    """The figures of one boot's results (raises RuntimeError naming a failed step)."""
    setup, lat, cpu = _step(doc, "setup"), _step(doc, "latency"), _step(doc, "cpu")
    kernel = summary(
        "kernel_deny_ms",
        [ns / 1e6 for ns in lat["kernel_ns"]],
        note="VM (TCG): nobody's net-pf-5 refused in-kernel (legacy-net-protocols), no helper",
    )
    helper = summary(
        "helper_deny_ms_vm",
        [ns / 1e6 for ns in lat["helper_ns"]],
        note="VM (TCG), interleaved: nobody's net-pf-4 (not in the table, rule bench-ipx): "
        f"kmodd-modprobe runs, the daemon answers {'/'.join(lat['helper_verdicts']) or '?'}",
    )
    out = [kernel, helper, ratio("helper_vs_kernel_deny", helper, kernel)]
    k, idle, h = cpu["kernel"], cpu["idle"], cpu["helper"]
    per_event = (k["cpu_s"] - idle["cpu_s"]) / max(1, k["records"]) * 1e6
    per_helper = (h["cpu_s"] - idle["cpu_s"] * h["wall_s"] / max(idle["wall_s"], 1e-9)) / max(
        1, h["records"]
    )
    per_helper *= 1e6
    tick_us = 1e6 / cpu["ticks_per_s"]
    cpu_note = (
        f"VM (TCG): {k['records']} of {k['requests']} events journaled, daemon CPU "
        f"{k['cpu_s']:.2f} s minus idle {idle['cpu_s']:.2f} s over {idle['wall_s']:.0f} s "
        f"(clock tick {tick_us / 1000:.0f} ms)"
    )
    event = Figure("daemon_cpu_us_per_kernel_event", per_event, "us", note=cpu_note)
    asked = Figure(
        "daemon_cpu_us_per_helper_request",
        per_helper,
        "us",
        note=f"VM (TCG): {h['records']} of {h['requests']} helper-decided requests",
    )
    start = Figure("vm_daemon_ready_s", float(setup["start_s"]), "s", note="VM (TCG): first build")
    return [*out, event, asked, ratio("helper_vs_kernel_daemon_cpu", asked, event), start]


def main() -> int:
    """In the child: boot, print the results as one JSON line."""
    from tests.vm.harness import VENV_BIN, boot, install_prefix  # noqa: PLC0415

    script = f"exec {shlex.quote(str(VENV_BIN / 'python'))} -m tests.vm.bench_guest\n"
    run = boot(script, timeout_s=BOOT_TIMEOUT_S, prepare=install_prefix)
    doc = {"results": run.results, "returncode": run.returncode, "seconds": run.duration_s}
    if not run.results:
        doc["error"] = run.tail(40)
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
