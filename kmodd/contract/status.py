"""The io.kmodd.Status document: what `kmodctl status --json` prints (docs/cli.md).

TypedDicts, not classes: the document crosses the control socket as JSON and is printed
as is, so the types describe that JSON exactly and cost nothing to build or read.
daemon/status.py builds a `StatusDocument` (mypy checks every key), cli/online.py reads
one.  Adding an entry is one key here (see the package docstring).
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict, cast

from kmodd.wire import ProtocolError


class GenerationInfo(TypedDict):
    number: int
    hash: str
    policy_hash: str
    created: float
    mode: str  # enforce | permissive | learn, after the kernel command line
    policy_mode: str  # what the policy files say
    mode_overridden: bool
    default: str
    files: list[str]
    masked: list[str]
    rules: int
    denied_modules: int
    # Not the admin's policy: the shipped files alone, standing in for an invalid one at a
    # first start with no last good generation (why, and what to do); None otherwise.
    stands_in: str | None


class ReloadInfo(TypedDict):
    ok: bool
    cause: str  # start | signal | control | watch: PATHS
    at: float
    duration_s: float
    generation: int | None  # the new one on success, the kept one on failure
    errors: list[str]


class DecisionCounters(TypedDict):
    verdicts: dict[str, int]  # Outcome -> count
    rules: dict[str, int]
    sources: dict[str, int]  # Source -> count
    invalid_names: int
    no_generation: int  # decide requests answered "error" (the helper fell back)


class JournalCounters(TypedDict):
    dropped: int  # the queue was full
    failed: int  # journald refused


class ServerCounters(TypedDict):
    refused_over_limit: int


class NotifyCounters(TypedDict):
    dropped: int  # sd_notify messages the manager did not take


class KernelModprobe(TypedDict):
    managed: bool
    points_at_helper: bool | None
    current: str | None
    expected: NotRequired[str]  # only when managed


class ConflictInfo(TypedDict):
    kind: str  # install | alias
    module: str
    detail: str


class DeviceDenied(TypedDict):
    devpath: str
    subsystem: str
    modalias: str
    modules: list[str]
    rule: str


class LoadedDenied(TypedDict):
    module: str
    rule: str
    reason: str


class LayerState(TypedDict):
    active: bool
    reason: str  # why (not) active, one human sentence


# design.md §5.4: one entry per enforcing layer, keyed by policy.coverage.Layer values
# (a plain dict so that renderers iterate it; a new layer is one name in LAYERS).
LAYERS = ("kernel", "helper", "modprobe_d", "udev")
Layers = dict[str, LayerState]


class KernelRuleInfo(TypedDict):
    """What the kernel layer (BPF LSM) holds of one deny rule (policy.kernelcov)."""

    holds: bool  # it refuses some of the rule's denies (requests or files) when active
    enforcing: bool  # holds, and the kernel layer is active now
    requests: bool  # the rule's kernel requests of the table's names, decided in-kernel
    files: list[str]  # modules whose files kernel_read_file refuses for this rule
    leaves: list[str]  # what the kernel layer cannot hold of it


class RuleCoverageInfo(TypedDict):
    """Which layers hold one deny rule (kmodd.policy.coverage.RuleCoverage)."""

    rule: str
    location: str | None  # FILE:LINE
    layers: list[str]  # Layer values, in LAYERS order then cmdline
    enforced: bool  # some layer holds it and nothing is left open
    gaps: list[str]  # what is not enforced and why, one sentence each
    remedy: str | None
    kernel: KernelRuleInfo | None  # None: computed without the kernel layer's reading


class InitramfsInfo(TypedDict):
    """The initramfs the boot loader loads for this release, and the policy in it."""

    path: str | None  # None: no image for the release under ROOT/boot
    policy_hash: str | None  # recorded by kmodd's initramfs hook; None: no record
    current: bool  # it carries the active generation's policy
    error: str | None  # the image could not be read


class WatcherInfo(TypedDict):
    running: bool
    errors: int  # failed flush/reconcile rounds (each retried)


class UdevInfo(TypedDict):
    running: bool
    source: str  # udev (after udevd's rules) or kernel (raw uevents)
    events: int
    skipped: int  # unreadable or hostile devices
    lost: int  # monitor failures recovered from


class StoredInfo(TypedDict):
    generation: int
    hash: str
    release: str
    created: float
    inputs: str  # the combined inputs digest
    policy_dirs: list[str]  # dirs that held policy files


class FallbackInfo(TypedDict):
    generation: int
    hash: str
    message: str


class LastGoodInfo(TypedDict):
    """The persisted store (kmodd.daemon.lastgood, docs/operations.md "Last good")."""

    store: str
    stored: StoredInfo | None
    refused: str | None  # why the store was not trusted
    boot_published: str | None  # RUNTIME_DIR/published at start
    fallback: FallbackInfo | None  # enforcing the stored generation: the policy is invalid
    verified: str | None  # the first build equalled the stored generation
    persist_note: str | None  # why the last generation was not persisted
    accept_removed_pending: list[str]


class StatusDocument(TypedDict):
    pid: int
    uptime_s: float
    started: float
    root: str
    release: str
    module_dir: str  # ROOT/lib/modules/REL, or ROOT/usr/lib/modules/REL (merged /usr)
    module_dir_base: str  # which of kmodd.paths.MODULE_BASES it is under
    runtime_dir: str
    generation: GenerationInfo | None
    mode: str | None
    last_reload: ReloadInfo | None
    decisions: DecisionCounters
    journal: JournalCounters
    server: ServerCounters
    notify: NotifyCounters
    kernel_modprobe: KernelModprobe
    enforcement_file: str
    snapshot: str
    conflicts: list[ConflictInfo]
    devices_denied: list[DeviceDenied]
    loaded_denied: list[LoadedDenied]
    notes: list[str]
    layers: Layers
    coverage: list[RuleCoverageInfo]  # one per deny rule of the active generation
    initramfs: InitramfsInfo | None  # None: no active generation
    watcher: WatcherInfo | None  # None: not watching (--no-watch)
    udev: UdevInfo | None  # None: no monitor (--no-udev, or it failed to open)
    last_good: LastGoodInfo | None  # None: a core without a store (tests)


def parse_status(params: dict[str, Any]) -> StatusDocument:
    """The reply of io.kmodd.Status as the document it is.  The daemon is trusted to send
    its own type (same package version); the keys every reader needs are checked so an
    unexpected peer fails with a clear error, not a KeyError deep in rendering."""
    missing = [k for k in ("pid", "decisions", "journal", "kernel_modprobe") if k not in params]
    if missing:
        raise ProtocolError(f"not a status document (missing {', '.join(missing)})")
    return cast(StatusDocument, params)
