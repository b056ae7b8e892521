"""Plain, immutable answers about modules.  Everything above kmodd.kmod speaks these types.

This file fixes the interface between the libkmod binding (producer) and the policy
engine, the compiler, the daemon and kmodctl (consumers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class StepKind(StrEnum):
    """What modprobe would do for one module of the load set (the `modprobe -D` verbs)."""

    INSMOD = "insmod"  # load the .ko file at `path`
    INSTALL = "install"  # run the modprobe.d install command instead of loading
    BUILTIN = "builtin"  # compiled into the kernel: nothing to load


@dataclass(frozen=True, slots=True)
class LoadStep:
    """One line of `modprobe -D NAME`, in load order."""

    module: str  # normalized module name ('-' -> '_')
    kind: StepKind
    path: str | None = None  # absolute .ko path for INSMOD
    command: str | None = None  # the install command for INSTALL
    options: str = ""  # merged options (modprobe.d, kernel command line)


@dataclass(frozen=True, slots=True)
class Resolution:
    """What a request name resolves to, and what loading it would load.

    `modules` is `modprobe -R NAME` (every module the name resolves to, in kmod's order,
    blacklist not applied).  `steps` is `modprobe -D NAME` (hard dependencies, softdeps
    and install commands in load order, alias-only blacklist applied as modprobe does).
    `load_set` is the module names of `steps`.
    """

    request: str
    modules: tuple[str, ...]
    steps: tuple[LoadStep, ...]
    blacklisted: tuple[str, ...] = ()  # resolved through an alias but skipped by a blacklist line

    @property
    def load_set(self) -> tuple[str, ...]:
        return tuple(step.module for step in self.steps)

    @property
    def resolved(self) -> bool:
        return bool(self.modules)


@dataclass(frozen=True, slots=True)
class ModuleInfo:
    """modinfo fields of one module (from the .ko or modules.builtin.modinfo)."""

    name: str
    builtin: bool
    path: str | None = None
    description: str | None = None
    license: str | None = None
    signer: str | None = None
    aliases: tuple[str, ...] = ()
    depends: tuple[str, ...] = ()
    softdeps: str | None = None  # raw "pre: a b post: c" as libkmod reports it
    install_commands: str | None = None
    remove_commands: str | None = None
    options: str = ""
    blacklisted: bool = False
    extra: tuple[tuple[str, str], ...] = field(default=())


@dataclass(frozen=True, slots=True)
class ConfigLine:
    """A modprobe.d line with its provenance: what libkmod applies but cannot locate."""

    path: str
    line: int  # 1-based, of the first physical line
    directive: str  # alias, blacklist, install, remove, options, softdep, weakdep
    target: str  # normalized pattern or module name the directive is about
    text: str  # the logical line as kmod joined it
    # what the line says about target: alias -> the normalized module, install/remove ->
    # the command, options -> the options (tabs as spaces), softdep -> "pre: ... post: ...",
    # blacklist -> ""
    value: str = ""

    def location(self) -> str:
        return f"{self.path}:{self.line}"
