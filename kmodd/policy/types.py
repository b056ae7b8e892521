"""The policy vocabulary as plain StrEnums: no pydantic, cheap to import (hot path, CLI)."""

from __future__ import annotations

from enum import StrEnum


class Action(StrEnum):
    """What a rule (or the default) says about a module or request."""

    ALLOW = "allow"
    DENY = "deny"


class Verdict(StrEnum):
    """What the policy says about a request (before permissive mode is applied)."""

    ALLOW = "allow"
    DENY = "deny"


class Mode(StrEnum):
    """enforce: deny verdicts block.  permissive: they are logged as would-deny only.
    learn: as permissive (nothing blocks, nothing is rendered for kmod); meant for
    recording what a machine loads, and who asks, for `kmodctl generate`."""

    ENFORCE = "enforce"
    PERMISSIVE = "permissive"
    LEARN = "learn"


class Outcome(StrEnum):
    """What happened to a request: the verdict after the mode (`Decision.outcome`).  The
    status counters, the journal's MESSAGE_ID and `kmodctl simulate` all count these."""

    ALLOW = "allow"
    DENY = "deny"  # blocked
    WOULD_DENY = "would_deny"  # the policy denies, a permissive or learning mode let it pass

    @classmethod
    def of(cls, verdict: Verdict, mode: Mode) -> Outcome:
        if verdict is Verdict.ALLOW:
            return cls.ALLOW
        return cls.DENY if mode is Mode.ENFORCE else cls.WOULD_DENY

    @property
    def loaded(self) -> bool:
        """The module was (or would have been) loaded."""
        return self is not Outcome.DENY


class Source(StrEnum):
    """Who asked for the module: the kernel (modprobe_path), udev (MODALIAS), kmodctl."""

    KERNEL = "kernel"
    UDEV = "udev"
    CLI = "cli"
