"""Reading `systemd-analyze` output: userspace boot time and kmodd's share of the boot's
critical chain (issue 14 item 2's goal: at most 5 %).  Also `bench_boot_share()`, the
entry `make bench` calls (bench/ wires it; it boots the real-boot image twice)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SPAN = re.compile(r"(\d+(?:\.\d+)?)(min|ms|us|µs|s|h)")
_FACTOR = {"h": 3600.0, "min": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}
_CHAIN_LINE = re.compile(r"^[\s│└├─]*(\S+\.[a-z]+) @([^+]+?)(?: \+(.+))?$")
_USERSPACE = re.compile(r"\+ ([^()+=]+?) \(userspace\)")
KMODD_UNITS = ("kmodd.service", "kmodd-boot-publish.service", "kmodd-boot-wait.service")


class AnalyzeError(ValueError):
    """systemd-analyze output this module cannot read; the message quotes it."""


def timespan_s(text: str) -> float:
    """systemd's timespan format ("1min 2.345s", "345ms") in seconds."""
    parts = _SPAN.findall(text.replace(" ", ""))
    if not parts:
        raise AnalyzeError(f"not a timespan: {text!r}")
    return sum(float(n) * _FACTOR[unit] for n, unit in parts)


def userspace_s(analyze_time: str) -> float:
    """The "(userspace)" part of `systemd-analyze time`."""
    m = _USERSPACE.search(analyze_time)
    if m is None:
        raise AnalyzeError(f"no userspace time in: {analyze_time!r}")
    return timespan_s(m.group(1))


@dataclass(frozen=True)
class ChainUnit:
    unit: str
    at_s: float
    took_s: float  # 0.0 when systemd-analyze prints no "+" (a target, or instant)


@dataclass(frozen=True)
class ChainShare:
    userspace_s: float
    chain: tuple[ChainUnit, ...]
    kmodd_s: float  # time kmodd's units spent on the chain

    @property
    def target_s(self) -> float:
        """When the default target was reached (the chain's head), in userspace time."""
        return self.chain[0].at_s

    @property
    def share(self) -> float:
        """kmodd's part of the boot's critical chain.  The denominator is the default
        target's time, not `systemd-analyze time`'s userspace figure: that one waits for
        every job, kmodd.service's own off-chain build included (measured: 3 min 22 s
        userspace, the target reached at 1 min 2 s), which would hide kmodd's share."""
        return self.kmodd_s / self.target_s if self.target_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "userspace_s": round(self.userspace_s, 3),
            "default_target_s": round(self.target_s, 3),
            "kmodd_on_chain_s": round(self.kmodd_s, 3),
            "kmodd_chain_share": round(self.share, 4),
            "kmodd_units_on_chain": [u.unit for u in self.chain if u.unit in KMODD_UNITS],
        }


def parse_chain(text: str) -> tuple[ChainUnit, ...]:
    units = []
    for line in text.splitlines():
        m = _CHAIN_LINE.match(line.strip("\n"))
        if m:
            took = timespan_s(m.group(3)) if m.group(3) else 0.0
            units.append(ChainUnit(m.group(1), timespan_s(m.group(2)), took))
    if not units:
        raise AnalyzeError(f"no units in critical chain: {text[:500]!r}")
    return tuple(units)


def chain_share(critical_chain: str, analyze_time: str) -> ChainShare:
    chain = parse_chain(critical_chain)
    kmodd = sum(u.took_s for u in chain if u.unit in KMODD_UNITS)
    return ChainShare(userspace_s(analyze_time), chain, kmodd)


def boot_share(boot_facts: dict[str, Any]) -> ChainShare:
    """From a real-boot `boot` step's facts."""
    return chain_share(str(boot_facts["critical_chain"]), str(boot_facts["analyze_time"]))


def bench_boot_share(workdir: Path, release: str = "bookworm") -> dict[str, Any]:
    """For `make bench`: build (or reuse) the image, boot it twice (the first boot takes
    the slow path and persists the last good generation; the second publishes it before
    udev), and return both boots' shares.  ~4-6 min under TCG after the image exists.
    Run it under the machine's VM slot (KMODD_VM_WRAPPER)."""
    from tests.realboot.image import build_image  # noqa: PLC0415 (bench imports lazily)
    from tests.realboot.qemu import boot  # noqa: PLC0415

    image = build_image(release)
    first = boot(image, "measure", workdir / "first", timeout_s=1200)
    second = boot(image, "measure", workdir / "second", disk=first.disk, timeout_s=900)
    return {
        "release": release,
        "first_boot": boot_share(first.step("boot")).as_dict(),
        "second_boot": boot_share(second.step("boot")).as_dict(),
        "second_boot_published": second.step("boot").get("published"),
    }
