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
from kmodd.daemon import records
from kmodd.daemon.server import Peer
from kmodd.policy.engine import Decision
from kmodd.policy.types import Source, Verdict

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


def _generation(core: Core) -> dict[str, Any] | None:
    gen = core.generation
    if gen is None:
        return None
    return {
        "number": gen.number,
        "hash": gen.hash,
        "policy_hash": gen.policy.hash,
        "created": gen.created,
        "mode": gen.mode.value,
        "policy_mode": gen.policy.mode.value,
        "mode_overridden": gen.mode_overridden,
        "default": gen.compiled.default.value,
        "files": list(gen.compiled.files),
        "masked": list(gen.policy.masked),
        "rules": len(gen.compiled.rules),
        "denied_modules": len(gen.denied_modules),
    }


def _last_reload(core: Core) -> dict[str, Any] | None:
    r = core.last_reload
    if r is None:
        return None
    return {
        "ok": r.ok,
        "cause": r.cause,
        "at": r.at,
        "duration_s": round(r.duration_s, 3),
        "generation": r.generation,
        "errors": list(r.errors),
    }


def _kernel_modprobe(core: Core) -> dict[str, Any]:
    state = core.tamper
    if core.edges.modprobe_path is None or state is None:
        return {"managed": False, "points_at_helper": None, "current": None}
    return {
        "managed": True,
        "points_at_helper": state.ok,
        "current": state.current,
        "expected": state.expected,
    }


def devices_denied(core: Core) -> list[dict[str, Any]]:
    gen = core.generation
    if gen is None:
        return []
    out = []
    for devpath, dev in sorted(core.devices.items()):
        d = gen.decide(dev.modalias, Source.UDEV)
        if d.verdict is Verdict.DENY:
            out.append(
                {
                    "devpath": devpath,
                    "subsystem": dev.subsystem,
                    "modalias": dev.modalias,
                    "modules": list(d.modules),
                    "rule": d.rule,
                }
            )
    return out


def loaded_denied(core: Core, proc_modules: Path | None = None) -> list[dict[str, str]]:
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
            out.append({"module": name, "rule": d.rule, "reason": d.reason})
    return out


def status(core: Core) -> dict[str, Any]:
    gen = core.generation
    stats = core.stats
    return {
        "pid": os.getpid(),
        "uptime_s": round(time.time() - core.started, 3),
        "started": core.started,
        "root": str(core.paths.root),
        "release": core.paths.release,
        "runtime_dir": str(core.paths.runtime_dir),
        "generation": _generation(core),
        "mode": None if gen is None else gen.mode.value,
        "last_reload": _last_reload(core),
        "decisions": {
            "verdicts": dict(stats.verdicts),
            "rules": dict(stats.rules),
            "sources": dict(stats.sources),
            "invalid_names": stats.invalid_names,
            "no_generation": stats.no_generation,
        },
        "journal": {"dropped": core.sink.dropped, "failed": core.sink.failed},
        "server": {"refused_over_limit": core.server_overflows},
        # sd_notify messages the relay dropped because the manager stopped reading
        "notify": {"dropped": int(getattr(core.edges.notifier, "dropped", 0))},
        "kernel_modprobe": _kernel_modprobe(core),
        "enforcement_file": str(core.paths.enforcement_file),
        "snapshot": str(core.paths.snapshot),
        "conflicts": [] if gen is None else [vars_(c) for c in gen.conflicts],
        "devices_denied": devices_denied(core),
        "loaded_denied": loaded_denied(core),
        "notes": list(core.notes),
        "attribution": None if core.edges.attributor is None else core.edges.attributor.status(),
        "last_good": None if core.edges.last_good is None else core.edges.last_good.status(),
    }


def vars_(conflict: object) -> dict[str, Any]:
    return {k: getattr(conflict, k) for k in ("kind", "module", "detail")}
