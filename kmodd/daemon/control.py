"""The control methods (io.kmodd.*): Status, Explain, Decide and Reload.

Runs on the core thread (the core hands every control call here); the server has already
checked who may call what (wire.Method and server.ROOT_ONLY).  Gets a narrow Controller,
never the Core itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from kmodd import wire
from kmodd.daemon import status
from kmodd.daemon.decider import Decider
from kmodd.daemon.events import ReloadCause
from kmodd.daemon.server import Peer
from kmodd.daemon.view import CoreView
from kmodd.policy.engine import Decision
from kmodd.policy.types import Source

NAME_MAX = 4096  # request names are <= 55 bytes; device modaliases stay under 2 KiB
Respond = Callable[[bytes], None]
Reply = Callable[[str | None], None]
_SOURCES = frozenset(s.value for s in Source)


class Controller(Protocol):
    @property
    def decider(self) -> Decider: ...
    def view(self) -> CoreView: ...
    def request_reload(self, cause: ReloadCause, reply: Reply | None, detail: str = "") -> None: ...
    def accept_removed(self, values: object) -> str | None: ...


def dispatch(ctl: Controller, call: wire.Call, peer: Peer, respond: Respond) -> None:
    try:
        match call.method:
            case wire.Method.STATUS:
                respond(wire.encode_reply(status.status(ctl.view())))
            case wire.Method.RELOAD:
                reload(ctl, respond, call.parameters)
            case wire.Method.EXPLAIN:
                respond(decide(ctl.decider, call.parameters, peer, log=False))
            case wire.Method.DECIDE:
                respond(decide(ctl.decider, call.parameters, peer, log=True))
    except Exception as err:  # a bug in one call must not take the daemon down
        respond(wire.encode_error(wire.ErrorName.INTERNAL, f"{type(err).__name__}: {err}"))


def reload(ctl: Controller, respond: Respond, params: dict[str, Any] | None = None) -> None:
    # `kmodctl reload --accept-removed DIR` (kmodd.daemon.lastgood)
    problem = ctl.accept_removed((params or {}).get("accept_removed", []))
    if problem is not None:
        respond(wire.encode_error(wire.ErrorName.INVALID_PARAMETER, problem))
        return

    def done(error: str | None) -> None:
        view = ctl.view()
        gen = view.generation
        if error is None and gen is not None:
            respond(wire.encode_reply({"generation": gen.number, "hash": gen.hash}))
            return
        errors = list(view.last_reload.errors) if view.last_reload else [str(error)]
        respond(
            wire.encode_error(
                wire.ErrorName.RELOAD_FAILED,
                f"reload failed with {len(errors)} error(s)",
                errors=errors,
                kept_generation=None if gen is None else gen.number,
            )
        )

    ctl.request_reload(ReloadCause.CONTROL, done)


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


def decide(decider: Decider, params: dict[str, Any], peer: Peer, *, log: bool) -> bytes:
    name, source = params.get("name"), params.get("source", Source.CLI.value)
    if not isinstance(name, str) or not 0 < len(name) <= NAME_MAX or "\0" in name:
        return wire.encode_error(wire.ErrorName.INVALID_PARAMETER, "'name' must be a short string")
    if source not in _SOURCES:
        return wire.encode_error(wire.ErrorName.INVALID_PARAMETER, f"unknown source {source!r}")
    gen = decider.generation
    if gen is None:
        return wire.encode_error(wire.ErrorName.NO_GENERATION, "no policy generation is active")
    if log:
        d = decider.logged(name, Source(source), peer_pid=peer.pid)
    else:
        found = decider.answer(name, Source(source))
        d = None if found is None else found.decision
    assert d is not None  # a generation is active
    return wire.encode_reply(decision_dict(d, gen.number))
