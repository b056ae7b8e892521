"""The control methods (io.kmodd.*) and the status document kmodctl shows.

Runs on the core thread (called by Core.control); the server has already checked who may
call what (wire.Method and server.ROOT_ONLY).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kmodd import wire
from kmodd.contract.status import (
    ConflictInfo,
    DeviceDenied,
    GenerationInfo,
    KernelModprobe,
    Layers,
    LayerState,
    LoadedDenied,
    ReloadInfo,
    StatusDocument,
    UdevInfo,
    WatcherInfo,
)
from kmodd.daemon import records
from kmodd.daemon.generation import Conflict
from kmodd.daemon.server import Peer
from kmodd.policy.engine import Decision
from kmodd.policy.types import Mode, Source, Verdict

if TYPE_CHECKING:
    from kmodd.daemon.core import Core

NAME_MAX = 4096  # request names are <= 55 bytes; device modaliases stay under 2 KiB
LOADED_MAX = 4096  # /proc/modules lines considered
Respond = Callable[[bytes], None]


def dispatch(core: Core, call: wire.Call, peer: Peer, respond: Respond) -> None:
    try:
        match call.method:
            case wire.Method.STATUS:
                respond(wire.encode_reply(status(core)))
            case wire.Method.RELOAD:
                reload(core, respond, call.parameters)
            case wire.Method.EXPLAIN:
                respond(decide(core, call.parameters, peer, log=False))
            case wire.Method.DECIDE:
                respond(decide(core, call.parameters, peer, log=True))
    except Exception as err:  # a bug in one call must not take the daemon down
        respond(wire.encode_error(wire.ErrorName.INTERNAL, f"{type(err).__name__}: {err}"))


def reload(core: Core, respond: Respond, params: dict[str, Any] | None = None) -> None:
    lg = core.edges.last_good  # `kmodctl reload --accept-removed DIR` (kmodd.daemon.lastgood)
    problem = None if lg is None else lg.accept((params or {}).get("accept_removed", []))
    if problem is not None:
        respond(wire.encode_error(wire.ErrorName.INVALID_PARAMETER, problem))
        return

    def done(error: str | None) -> None:
        gen = core.generation
        if error is None and gen is not None:
            respond(wire.encode_reply({"generation": gen.number, "hash": gen.hash}))
        else:
            errors = list(core.last_reload.errors) if core.last_reload else [str(error)]
            respond(
                wire.encode_error(
                    wire.ErrorName.RELOAD_FAILED,
                    f"reload failed with {len(errors)} error(s)",
                    errors=errors,
                    kept_generation=None if gen is None else gen.number,
                )
            )

    core.request_reload("control", done)


def decision_dict(d: Decision, generation: int) -> dict[str, Any]:
    return {
        "request": d.request,
        "source": d.source.value,
        "class": d.request_class.value,
        "modules": list(d.modules),
        "load_set": list(d.load_set),
        "verdict": d.verdict.value,
        "effective": d.effective.value,
        "rule": d.rule,
        "module": d.module,
        "mode": d.mode.value,
        "reason": d.reason,
        "generation": generation,
    }


def decide(core: Core, params: dict[str, Any], peer: Peer, *, log: bool) -> bytes:
    name, source = params.get("name"), params.get("source", Source.CLI.value)
    if not isinstance(name, str) or not 0 < len(name) <= NAME_MAX or "\0" in name:
        return wire.encode_error(wire.ErrorName.INVALID_PARAMETER, "'name' must be a short string")
    if source not in {s.value for s in Source}:
        return wire.encode_error(wire.ErrorName.INVALID_PARAMETER, f"unknown source {source!r}")
    gen = core.generation
    if gen is None:
        return wire.encode_error(wire.ErrorName.NO_GENERATION, "no policy generation is active")
    d = gen.decide(name, Source(source))
    if log:
        core.stats.count(d)
        core.sink.emit(records.decision(d, gen.number, peer_pid=peer.pid))
    return wire.encode_reply(decision_dict(d, gen.number))


def _generation(core: Core) -> GenerationInfo | None:
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
    )


def _last_reload(core: Core) -> ReloadInfo | None:
    r = core.last_reload
    if r is None:
        return None
    return ReloadInfo(
        ok=r.ok,
        cause=r.cause,
        at=r.at,
        duration_s=round(r.duration_s, 3),
        generation=r.generation,
        errors=list(r.errors),
    )


def _kernel_modprobe(core: Core) -> KernelModprobe:
    state = core.tamper
    if core.edges.modprobe_path is None or state is None:
        return KernelModprobe(managed=False, points_at_helper=None, current=None)
    return KernelModprobe(
        managed=True, points_at_helper=state.ok, current=state.current, expected=state.expected
    )


def _helper_layer(core: Core) -> LayerState:
    """Layer 1: the kernel runs the helper for every request_module()."""
    if core.edges.static_usermodehelper is not None:
        return LayerState(active=False, reason="CONFIG_STATIC_USERMODEHELPER=y: not used")
    state = core.tamper
    if core.edges.modprobe_path is None or state is None:
        return LayerState(active=False, reason="kernel.modprobe is not managed by this daemon")
    if not state.ok:
        return LayerState(active=False, reason=f"kernel.modprobe is {state.current!r}")
    return LayerState(active=True, reason=f"kernel.modprobe points at {state.expected}")


def _modprobe_d_layer(core: Core) -> LayerState:
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


def _udev_layer(core: Core) -> LayerState:
    udev = core.edges.udev
    if udev is None:
        return LayerState(active=False, reason="no uevent monitor (--no-udev, or it failed)")
    return LayerState(active=True, reason=f"uevent monitor running ({udev.source} events)")


def _kernel_layer(core: Core) -> LayerState:
    kernel = core.edges.kernel
    if kernel is None:
        return LayerState(
            active=False, reason="not started (--no-kernel-layer, or --root is not /)"
        )
    return kernel.state()


def layers(core: Core) -> Layers:
    """One entry per enforcing layer (design.md §5.4), from what this daemon knows."""
    return {
        "kernel": _kernel_layer(core),
        "helper": _helper_layer(core),
        "modprobe_d": _modprobe_d_layer(core),
        "udev": _udev_layer(core),
    }


def _watcher(core: Core) -> WatcherInfo | None:
    w = core.edges.watcher
    return None if w is None else WatcherInfo(running=True, errors=w.errors)


def _udev(core: Core) -> UdevInfo | None:
    udev = core.edges.udev
    if udev is None:
        return None
    c = udev.counters
    return UdevInfo(
        running=True, source=udev.source, events=c.events, skipped=c.skipped, lost=c.lost
    )


def devices_denied(core: Core) -> list[DeviceDenied]:
    gen = core.generation
    if gen is None:
        return []
    out = []
    for devpath, dev in sorted(core.devices.items()):
        d = gen.decide(dev.modalias, Source.UDEV)
        if d.verdict is Verdict.DENY:
            out.append(
                DeviceDenied(
                    devpath=devpath,
                    subsystem=dev.subsystem,
                    modalias=dev.modalias,
                    modules=list(d.modules),
                    rule=d.rule,
                )
            )
    return out


def loaded_denied(core: Core, proc_modules: Path | None = None) -> list[LoadedDenied]:
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
        d = gen.decide(name, Source.KERNEL)
        if d.verdict is Verdict.DENY:
            out.append(LoadedDenied(module=name, rule=d.rule, reason=d.reason))
    return out


def status(core: Core) -> StatusDocument:
    gen = core.generation
    stats = core.stats
    return StatusDocument(
        pid=os.getpid(),
        uptime_s=round(time.time() - core.started, 3),
        started=core.started,
        root=str(core.paths.root),
        release=core.paths.release,
        runtime_dir=str(core.paths.runtime_dir),
        generation=_generation(core),
        mode=None if gen is None else gen.mode.value,
        last_reload=_last_reload(core),
        decisions={
            "verdicts": dict(stats.verdicts),
            "rules": dict(stats.rules),
            "sources": dict(stats.sources),
            "invalid_names": stats.invalid_names,
            "no_generation": stats.no_generation,
        },
        journal={"dropped": core.sink.dropped, "failed": core.sink.failed},
        server={"refused_over_limit": core.server_overflows},
        # sd_notify messages the notifier dropped because the manager stopped reading
        notify={"dropped": core.edges.notifier.dropped},
        kernel_modprobe=_kernel_modprobe(core),
        enforcement_file=str(core.paths.enforcement_file),
        snapshot=str(core.paths.snapshot),
        conflicts=[] if gen is None else [_conflict(c) for c in gen.conflicts],
        devices_denied=devices_denied(core),
        loaded_denied=loaded_denied(core),
        notes=list(core.notes),
        attribution=None if core.edges.attributor is None else core.edges.attributor.status(),
        layers=layers(core),
        watcher=_watcher(core),
        udev=_udev(core),
        last_good=None if core.edges.last_good is None else core.edges.last_good.status(),
    )


def _conflict(c: Conflict) -> ConflictInfo:
    return ConflictInfo(kind=c.kind, module=c.module, detail=c.detail)
