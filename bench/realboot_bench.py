"""kmodd's share of the boot's critical chain, from real boots (issue 14 item 2's goal:
at most 5 % in the VM): the real-boot image (tests/realboot) booted twice under qemu with
systemd as PID 1.  The first boot takes the slow path (no last good generation: the
wait holds udev until the daemon published); the second publishes the stored generation
before udev, so only kmodd-boot-publish can be on its chain.

The share is the `+` time of kmodd's units on `systemd-analyze critical-chain` over the
time the default target was reached (tests/realboot/analyze.py says why not the
userspace figure).  Under TCG (no KVM here) a Python start costs 1.5-2.5 s, ~100x
native, while the kernel's part of the boot is not slowed as much, so the VM's share
overstates a real machine's; `boot_publish_ms` (bench/boot_bench.py) is the same step
measured natively.

`python -m bench --realboot-results DIR` reads the `first.results.json` and
`second.results.json` a real-boot run leaves in its work dir (tests/realboot/conftest.py)
instead of booting; `--no-vm` skips it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from bench.stats import Cmp, Figure, Goal

GOAL_SHARE = 0.05


def boot_results() -> dict[str, Any]:
    """Build (or reuse) the image and boot it twice (~10 min under TCG, root)."""
    from tests.realboot.analyze import bench_boot_share  # noqa: PLC0415 (bench imports lazily)

    with tempfile.TemporaryDirectory(prefix="kmodd-bench-realboot-", dir="/var/tmp") as work:
        return bench_boot_share(Path(work))


def saved_results(workdir: Path) -> dict[str, Any]:
    """The same dict from a real-boot run's kept results (its `boot` steps)."""
    from tests.realboot.analyze import boot_share  # noqa: PLC0415

    doc: dict[str, Any] = {"release": f"saved: {workdir}"}
    for plan in ("first", "second"):
        results = json.loads((workdir / f"{plan}.results.json").read_text())
        boot = results["steps"]["boot"]["facts"]
        doc[f"{plan}_boot"] = boot_share(boot).as_dict()
        if plan == "second":
            doc["second_boot_published"] = boot.get("published")
    return doc


def figures(doc: dict[str, Any]) -> list[Figure]:
    """The figures of two boots' shares (KeyError/TypeError on a malformed doc)."""
    first, second = doc["first_boot"], doc["second_boot"]

    def units(share: dict[str, Any]) -> str:
        return ", ".join(share["kmodd_units_on_chain"]) or "none"

    return [
        Figure(
            "boot_chain_share",
            float(second["kmodd_chain_share"]),
            "",
            goal=Goal(Cmp.LE, GOAL_SHARE),
            note=f"VM (TCG), fast path: {second['kmodd_on_chain_s']} s of kmodd on the chain "
            f"({units(second)}) of {second['default_target_s']} s to the default target",
        ),
        Figure(
            "boot_chain_share_slow_path",
            float(first["kmodd_chain_share"]),
            "",
            note=f"VM (TCG), first boot: {first['kmodd_on_chain_s']} s ({units(first)}) "
            f"of {first['default_target_s']} s; the daemon builds while udev waits",
        ),
    ]
