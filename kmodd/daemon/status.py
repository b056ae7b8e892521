"""The status document (io.kmodd.Status, `kmodctl status`), built from a read-only view
of the core (kmodd.daemon.view); its type is kmodd.contract.status."""

from __future__ import annotations

import os
import time
from pathlib import Path

from kmodd.contract.status import (
    LAYERS,
    ConflictInfo,
    DeviceDenied,
    GenerationInfo,
    InitramfsInfo,
    KernelModprobe,
    KernelRuleInfo,
    Layers,
    LayerState,
    LoadedDenied,
    ReloadInfo,
    RuleCoverageInfo,
    StatusDocument,
    UdevInfo,
    WatcherInfo,
)
from kmodd.daemon.generation import Conflict
from kmodd.daemon.view import CoreView
from kmodd.policy.coverage import KernelCoverage, Layer
from kmodd.policy.types import Mode, Source, Verdict

LOADED_MAX = 4096  # /proc/modules lines considered


def _generation(core: CoreView) -> GenerationInfo | None:
    gen = core.generation
    if gen is None:
        return None
    return GenerationInfo(
        number=gen.number,
        hash=gen.hash,
        policy_hash=gen.policy.hash,
        created=gen.created,
        mode=gen.mode.value,
        policy_mode=gen.policy.mode.value,
        mode_overridden=gen.mode_overridden,
        default=gen.compiled.default.value,
        files=list(gen.compiled.files),
        masked=list(gen.policy.masked),
        rules=len(gen.compiled.rules),
        denied_modules=len(gen.denied_modules),
        stands_in=gen.stands_in,
    )


def _last_reload(core: CoreView) -> ReloadInfo | None:
    r = core.last_reload
    if r is None:
        return None
    return ReloadInfo(
        ok=r.ok,
        cause=r.cause_text,
        at=r.at,
        duration_s=round(r.duration_s, 3),
        generation=r.generation,
        errors=list(r.errors),
    )


def _kernel_modprobe(core: CoreView) -> KernelModprobe:
    state = core.tamper
    if not core.modprobe_managed or state is None:
        return KernelModprobe(managed=False, points_at_helper=None, current=None)
    return KernelModprobe(
        managed=True, points_at_helper=state.ok, current=state.current, expected=state.expected
    )


def _helper_layer(core: CoreView) -> LayerState:
    """Layer 1: the kernel runs the helper for every request_module()."""
    if core.static_usermodehelper is not None:
        return LayerState(active=False, reason="CONFIG_STATIC_USERMODEHELPER=y: not used")
    state = core.tamper
    if not core.modprobe_managed or state is None:
        return LayerState(active=False, reason="kernel.modprobe is not managed by this daemon")
    if not state.ok:
        return LayerState(active=False, reason=f"kernel.modprobe is {state.current!r}")
    return LayerState(active=True, reason=f"kernel.modprobe points at {state.expected}")


def _modprobe_d_layer(core: CoreView) -> LayerState:
    """Layer 2: kmod (udev, modules-load, an admin's modprobe) reads the rendered file."""
    gen, path = core.generation, core.paths.enforcement_file
    if gen is None:
        return LayerState(active=False, reason="no policy generation")
    if gen.mode is not Mode.ENFORCE:
        return LayerState(active=False, reason=f"mode {gen.mode.value}: nothing is rendered")
    try:
        in_place = path.read_text() == gen.enforcement
    except OSError:
        in_place = False
    if not in_place:
        return LayerState(active=False, reason=f"{path} does not hold generation {gen.number}")
    return LayerState(active=True, reason=f"{path} ({len(gen.denied_modules)} denied modules)")


def _udev_layer(core: CoreView) -> LayerState:
    udev = core.udev
    if udev is None:
        return LayerState(active=False, reason="no uevent monitor (--no-udev, or it failed)")
    return LayerState(active=True, reason=f"uevent monitor running ({udev.source} events)")


def _kernel_layer(core: CoreView) -> LayerState:
    kernel = core.kernel
    if kernel is None:
        return LayerState(
            active=False, reason="not started (--no-kernel-layer, or --root is not /)"
        )
    return kernel.state()


def layers(core: CoreView) -> Layers:
    """One entry per enforcing layer (design.md §5.4), from what this daemon knows."""
    return {
        "kernel": _kernel_layer(core),
        "helper": _helper_layer(core),
        "modprobe_d": _modprobe_d_layer(core),
        "udev": _udev_layer(core),
    }


def _watcher(core: CoreView) -> WatcherInfo | None:
    w = core.watcher
    return None if w is None else WatcherInfo(running=True, errors=w.errors)


def _udev(core: CoreView) -> UdevInfo | None:
    udev = core.udev
    if udev is None:
        return None
    c = udev.counters
    return UdevInfo(
        running=True, source=udev.source, events=c.events, skipped=c.skipped, lost=c.lost
    )


def devices_denied(core: CoreView) -> list[DeviceDenied]:
    gen = core.generation
    if gen is None:
        return []
    out = []
    for dev in sorted(core.devices, key=lambda x: x.devpath):
        d = core.decide(dev.modalias, Source.UDEV)
        if d is not None and d.verdict is Verdict.DENY:
            out.append(
                DeviceDenied(
                    devpath=dev.devpath,
                    subsystem=dev.subsystem,
                    modalias=dev.modalias,
                    modules=list(d.modules),
                    rule=d.rule,
                )
            )
    return out


def loaded_denied(core: CoreView, proc_modules: Path | None = None) -> list[LoadedDenied]:
    """Modules loaded right now (ROOT/proc/modules) that the policy denies."""
    gen = core.generation
    if gen is None:
        return []
    path = proc_modules or core.paths.root / "proc/modules"
    try:
        lines = path.read_text(errors="replace").splitlines()[:LOADED_MAX]
    except OSError:
        return []
    out = []
    for line in lines:
        name = line.split(" ", 1)[0]
        if not name:
            continue
        d = core.decide(name, Source.KERNEL)
        if d is not None and d.verdict is Verdict.DENY:
            out.append(LoadedDenied(module=name, rule=d.rule, reason=d.reason))
    return out


def status(core: CoreView) -> StatusDocument:
    gen = core.generation
    return StatusDocument(
        pid=os.getpid(),
        uptime_s=round(time.time() - core.started, 3),
        started=core.started,
        root=str(core.paths.root),
        release=core.paths.release,
        module_dir=str(core.paths.module_dir),
        module_dir_base=core.paths.module_base,
        runtime_dir=str(core.paths.runtime_dir),
        generation=_generation(core),
        mode=None if gen is None else gen.mode.value,
        last_reload=_last_reload(core),
        decisions=core.decisions,
        journal={"dropped": core.journal_dropped, "failed": core.journal_failed},
        server={"refused_over_limit": core.server_overflows},
        # sd_notify messages the notifier dropped because the manager stopped reading
        notify={"dropped": core.notify_dropped},
        kernel_modprobe=_kernel_modprobe(core),
        enforcement_file=str(core.paths.enforcement_file),
        snapshot=str(core.paths.snapshot),
        conflicts=[] if gen is None else [_conflict(c) for c in gen.conflicts],
        devices_denied=devices_denied(core),
        loaded_denied=loaded_denied(core),
        notes=list(core.notes),
        layers=layers(core),
        coverage=coverage(core),
        initramfs=initramfs(core),
        watcher=_watcher(core),
        udev=_udev(core),
        last_good=core.last_good,
    )


def coverage(core: CoreView) -> list[RuleCoverageInfo]:
    """Per deny rule of the active generation: which layers hold it (computed at build)."""
    gen = core.generation
    if gen is None:
        return []
    order = {name: i for i, name in enumerate((*LAYERS, "cmdline"))}
    active = _kernel_layer(core)["active"]
    out = []
    for c in gen.coverage:
        layers = set(c.layers)
        holds = c.kernel is not None and c.kernel.holds
        if holds and active:  # computed at build without it: the layer is a runtime fact
            layers.add(Layer.KERNEL)
        out.append(
            RuleCoverageInfo(
                rule=c.rule,
                location=c.location,
                layers=sorted((str(layer) for layer in layers), key=lambda n: order.get(n, 99)),
                enforced=c.enforced,
                gaps=list(c.gaps),
                remedy=c.remedy,
                kernel=_kernel_rule(c.kernel, active),
            )
        )
    return out


def _kernel_rule(k: KernelCoverage | None, active: bool) -> KernelRuleInfo | None:
    if k is None:
        return None
    return KernelRuleInfo(
        holds=k.holds,
        enforcing=k.holds and active,
        requests=k.requests,
        files=list(k.files),
        leaves=list(k.leaves),
    )


def initramfs(core: CoreView) -> InitramfsInfo | None:
    """Whether the initramfs for this release carries the active policy (read at build)."""
    gen = core.generation
    if gen is None or gen.initramfs is None:
        return None
    r = gen.initramfs
    return InitramfsInfo(
        path=r.path, policy_hash=r.policy_hash, current=r.current(gen.policy.hash), error=r.error
    )


def _conflict(c: Conflict) -> ConflictInfo:
    return ConflictInfo(kind=c.kind, module=c.module, detail=c.detail)
