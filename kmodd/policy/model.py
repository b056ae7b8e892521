"""The policy file schema (design §5.2): strict, frozen pydantic models.

These models exist only at the YAML boundary.  The decision engine never sees them: it
works on the plain matchers `kmodd.policy.engine.compile_policy` builds once per policy
generation.  Field docstrings become JSON-schema descriptions (`kmodctl schema`), which
editors show on hover, so they are written for policy authors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    field_validator,
    model_validator,
)

from kmodd.policy.requests import RequestClass
from kmodd.policy.types import Action, Mode, Source

__all__ = [
    "Action",
    "LocatedRule",
    "Match",
    "Mode",
    "PolicyFile",
    "PolicySet",
    "PolicySource",
    "RequesterMatch",
    "Rule",
    "Source",
    "glob_problem",
]

SCHEMA_VERSION = 1
# Request names are at most 55 bytes (helper.NAME_MAX); a glob may spell character
# classes out, so it gets more room, but stays bounded.
GLOB_MAX = 256
RULE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_GLOB_CHARS = re.compile(r"^[\x21-\x7e]+$")


def glob_problem(pattern: str) -> str | None:
    """Why PATTERN is not a usable glob, or None.  kmod rejects unbalanced brackets too."""
    if not _GLOB_CHARS.match(pattern):
        return "globs are printable ASCII without spaces"
    if "/" in pattern:
        return "module and request names never contain '/'"
    depth = 0
    for ch in pattern:
        if ch == "[":
            if depth:
                return "nested '[' in a glob"
            depth = 1
        elif ch == "]":
            if not depth:
                return "']' without a matching '['"
            depth = 0
    return "unclosed '[' in a glob" if depth else None


def _check_glob(pattern: str) -> str:
    problem = glob_problem(pattern)
    if problem is not None:
        raise ValueError(problem)
    return pattern


Glob = Annotated[
    str,
    # The pattern is for editors only; _check_glob gives the readable error.
    Field(min_length=1, max_length=GLOB_MAX, json_schema_extra={"pattern": "^[!-.0-~]+$"}),
    AfterValidator(_check_glob),
]


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        # Field docstrings are the schema descriptions, but pydantic's
        # use_attribute_docstrings parses this file's source on every import (~15 ms
        # of kmodctl explain); kmodd.cli.schema reads them only when asked.
        use_attribute_docstrings=False,
        populate_by_name=False,
    )


UnitGlob = Annotated[
    str,
    Field(min_length=1, max_length=GLOB_MAX, pattern=r"^[!-~]+$"),
]
Id = Annotated[int, Field(ge=0, le=4294967294)]


class RequesterMatch(_Strict):
    """Who triggered a kernel autoload (docs/attribution.md).  Every key given must match
    (AND); a list matches if any item does.  udev and kmodctl requests have no requester:
    the rule never applies to them.  A kernel autoload whose requester is unknown is
    decided by the rule with the policy's `unknown_requester` verdict (deny by default)."""

    uid: list[Id] | None = Field(default=None, min_length=1)
    """Real uids, as the initial user namespace sees them.  Example: [0, 1000]"""

    gid: list[Id] | None = Field(default=None, min_length=1)
    """Real gid or any supplementary group.  Example: [27]"""

    unprivileged: bool | None = None
    """true: the real uid is not 0 (as grsecurity MODHARDEN: a set-uid-root program run by
    a user counts as that user); false: it is 0."""

    unit: list[UnitGlob] | None = Field(default=None, min_length=1)
    """Globs on the systemd unit of the requester's cgroup.
    Example: ["libvirtd.service", "user@*.service", "session-*.scope"]"""

    container: bool | None = None
    """true: the requester is in a user or pid namespace other than the initial one, or in
    a container manager's cgroup (docker, podman, containerd, lxc, machined)."""

    @model_validator(mode="after")
    def _not_empty(self) -> RequesterMatch:
        keys = (self.uid, self.gid, self.unprivileged, self.unit, self.container)
        if all(key is None for key in keys):
            raise ValueError(
                "a requester match needs at least one of: uid, gid, unprivileged, unit, container"
            )
        return self


class Match(_Strict):
    """What a rule applies to.  Every key given must match (AND); a list matches if any
    item does (OR).  At least one key is required."""

    module: list[Glob] | None = Field(default=None, min_length=1)
    """Globs on the modules a request would load (resolved modules, hard dependencies,
    softdeps).  '-' and '_' are equal, as in kmod.  Example: [algif_aead, "dccp*"]"""

    request: list[Glob] | None = Field(default=None, min_length=1)
    """Globs on the raw request name as the kernel, udev or kmodctl sent it ('-' and '_'
    equal).  Example: ["net-pf-5", "fs-cramfs", "pci:v000010ECd*"]"""

    class_: list[Annotated[RequestClass, Strict(False)]] | None = Field(
        default=None, alias="class", min_length=1
    )
    """Request classes derived from the request name (see docs/policy.md): net_protocol,
    crypto, filesystem, char_device, block_device, tty_ldisc, binfmt, netdev, netfilter,
    modalias, symbol, other."""

    source: list[Annotated[Source, Strict(False)]] | None = Field(default=None, min_length=1)
    """Where the request came from: kernel (autoload via modprobe_path), udev (device
    MODALIAS), cli (kmodctl)."""

    requester: RequesterMatch | None = None
    """Who triggered the request (kernel autoloads only; see docs/attribution.md)."""

    @model_validator(mode="after")
    def _not_empty(self) -> Match:
        if not (self.module or self.request or self.class_ or self.source or self.requester):
            raise ValueError(
                "a match needs at least one of: module, request, class, source, requester"
            )
        return self


class Rule(_Strict):
    """One policy rule.  Rules are evaluated in file order, then list order; the first
    matching rule decides for each module of the load set."""

    id: str = Field(pattern=RULE_ID_PATTERN)
    """Unique across all policy files; shown in logs (KMODD_RULE) and by kmodctl explain."""

    action: Action = Field(strict=False)
    """allow or deny."""

    match: Match
    """What the rule applies to."""

    reason: str | None = Field(default=None, max_length=500)
    """Why the rule exists; shown in logs and by kmodctl explain."""

    reference: list[str] | str | None = None
    """Where the reason is documented: a CVE id, an advisory or benchmark URL (one or a
    list)."""

    @property
    def references(self) -> tuple[str, ...]:
        if self.reference is None:
            return ()
        return (self.reference,) if isinstance(self.reference, str) else tuple(self.reference)


class PolicyFile(_Strict):
    """One kmodd policy file (a *.yaml drop-in)."""

    schema_: str | None = Field(default=None, alias="$schema")
    """Optional JSON-schema reference for editors; ignored by kmodd."""

    kmodd: Literal[1]
    """Schema version of this file; must be 1."""

    mode: Mode | None = Field(default=None, strict=False)
    """enforce, permissive or learn (as permissive: nothing blocks; for recording what
    loads, see `kmodctl generate`); the last file (in basename order) that sets it wins;
    enforce if none does.  The kernel command line kmodd.mode=permissive overrides it."""

    default: Action | None = Field(default=None, strict=False)
    """Verdict for a module (or unresolvable request) that no rule matches; the last file
    that sets it wins; allow if none does."""

    unknown_requester: Action | None = Field(default=None, strict=False)
    """Verdict of a rule with a requester key when the requester of a kernel autoload is
    unknown (no kernel layer, or a requester key the kernel layer cannot decide: gid,
    unit, container): deny (fail closed) or allow.  The last file that sets it wins; deny
    if none does (docs/attribution.md)."""

    rules: list[Rule] = Field(default_factory=list)
    """Rules in evaluation order."""

    @field_validator("kmodd", mode="before")
    @classmethod
    def _no_bool(cls, value: object) -> object:
        # Literal[1] would take True (True == 1): YAML `kmodd: yes` is not a version.
        if isinstance(value, bool):
            raise ValueError("kmodd must be the integer 1 (the schema version)")
        return value


# ----------------------------------------------------------------------------------------
# A loaded policy generation: plain frozen dataclasses around the validated models.


@dataclass(frozen=True, slots=True)
class PolicySource:
    """One policy file that took part in a generation."""

    path: str
    sha256: str  # of the file's bytes


@dataclass(frozen=True, slots=True)
class LocatedRule:
    """A validated rule and where it was written."""

    rule: Rule
    path: str
    line: int  # 1-based line of the rule's first key
    column: int = 0  # 1-based column of that key (0: unknown)

    def location(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Every policy file of one generation, merged: what the engine compiles.

    `hash` is the generation hash (sha256 over basename, NUL, bytes, NUL of every file in
    order) that the daemon exposes; `masked` lists paths masked by a /dev/null symlink.
    """

    files: tuple[PolicySource, ...]
    rules: tuple[LocatedRule, ...]
    mode: Mode = Mode.ENFORCE
    default: Action = Action.ALLOW
    mode_from: str | None = None  # the file that set mode, None if nobody did
    default_from: str | None = None
    unknown_requester: Action = Action.DENY
    unknown_requester_from: str | None = None
    masked: tuple[str, ...] = ()
    hash: str = field(default="")
