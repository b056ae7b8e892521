"""The kmodctl verb table: names, help, arguments and (lazily imported) handlers.

Every verb is a VerbSpec.  Handlers are named as "module:function" strings and imported
only when the verb runs, so `kmodctl --help` and `kmodctl status` never pay for pydantic
(~75 ms) or libkmod.  Other modules contribute verbs by exporting `VERBS: tuple[VerbSpec,
...]`, listed in kmodd.cli.main.PLUGIN_MODULES.  This module imports only the stdlib (and
kmodd.policy.types, which does too).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from kmodd.policy.types import Source  # stdlib only, like this module


class Verb(StrEnum):
    VALIDATE = "validate"
    EXPLAIN = "explain"
    SCHEMA = "schema"
    STATUS = "status"
    RELOAD = "reload"
    INSTALL = "install"
    UNINSTALL = "uninstall"
    GENERATE = "generate"
    SIMULATE = "simulate"
    CMDLINE = "cmdline"
    VERIFY = "verify"


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


@dataclass(frozen=True, slots=True)
class VerbSpec:
    """One kmodctl verb.

    `handler` is "package.module:function"; the function takes the parsed
    argparse.Namespace (global options: root, kernel, runtime_dir, json, debug) and
    returns the exit code (0 ok, 1 failure/invalid/deny).  Raise kmodd.errors.KmoddError
    for user-facing failures: main() prints message and hint and exits 1.
    """

    verb: Verb
    help: str  # one line, shown in `kmodctl --help`
    handler: str
    add_arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    description: str | None = None  # longer text for `kmodctl VERB --help`
    epilog: str | None = None  # examples


def _validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="policy files or directories (*.yaml); default: the policy dirs under --root",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 also when a deny rule is not fully enforced (a warning), or when"
        " enforcement cannot be checked (no module tree)",
    )


def _explain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="a request name or module name")
    parser.add_argument(
        "--source",
        choices=[s.value for s in Source],
        default="kernel",
        help="who asks (default: kernel, as if request_module() had called the helper)",
    )
    parser.add_argument(
        "--policy",
        action="append",
        metavar="PATH",
        help="use these policy files/dirs instead of the policy dirs under --root",
    )


def _cmdline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policy",
        action="append",
        metavar="PATH",
        help="use these policy files/dirs instead of the policy dirs under --root",
    )


def _verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--module",
        action="append",
        metavar="NAME",
        help="check only this denied module (repeatable; default: every denied module)",
    )
    parser.add_argument(
        "--policy",
        action="append",
        metavar="PATH",
        help="use these policy files/dirs instead of the policy dirs under --root",
    )


CMDLINE_DESCRIPTION = """\
Print the kernel command-line arguments the policy implies for the tree under --root:
  module_blacklist=A,B     the kernel refuses to load these (every path: initramfs,
                           udev, insmod, modprobe), from the first instruction on
  initcall_blacklist=FN    built-in code (not a module file: modprobe.d and the helper
                           cannot stop it) is not initialised
Only modules the policy denies for every source are listed; built-in ones get their
initcall, found in this kernel's symbol table (System.map or /proc/kallsyms) or, when
there is none (Debian ships a stub System.map), by the <module>_init convention, said so.
The whole command line must stay under 2048 characters on x86.  Nothing is changed:
the output ends with how to add the arguments (GRUB, kernel-install, grubby)."""

VERIFY_DESCRIPTION = """\
Check that every module the policy denies is really kept out, by asking the enforcers
rather than kmodd: for each denied module (and denied built-in)

  KERNEL REQUEST  is kernel.modprobe the kmodd helper, and does its snapshot deny the
                  module (the path of request_module(): socket families, mounts, ...)
  MODPROBE        kmod's own `modprobe -n -v NAME` against the modprobe.d dirs under
                  --root: refused when it would insert no .ko of the module
                  (udev, systemd-modules-load and an admin's modprobe all use this)
  LOADED          in /proc/modules now (a deny cannot unload it)
  INITRAMFS       carried by /boot/initrd.img-RELEASE (or dracut's initramfs-RELEASE.img),
                  and if so, refused by the image's own modprobe.d
  BUILT-IN        in modules.builtin: no modprobe.d line or helper can deny it
  CIS             the usual CIS check: `modprobe -n -v NAME` shows `install /...` and
                  `modprobe --showconfig` shows `blacklist NAME`

A cell in capitals (LOADS, NO) is a failure.  'not denied' means the rule does not
apply to that path (e.g. `source: [udev]`).  Below the table each failure says why and
what to do; warnings cover the machine (stale initramfs, kernel.modprobe, mode).
Exit 0 when every denied module is enforced on every path it is denied for, 1 when
any is not (or the mode is permissive/learn: nothing is enforced)."""


OFFLINE: tuple[VerbSpec, ...] = (
    VerbSpec(
        Verb.VALIDATE,
        "check policy files; print every problem as FILE:LINE:COL",
        "kmodd.cli.validate:run",
        _validate_arguments,
        description="Validate policy files without applying them.  Exit 0 if valid, 1 if"
        " not; every problem is printed as FILE:LINE:COL: message (hint).  A valid policy"
        " is then checked against the module tree of --root/--kernel: every deny rule that"
        " no layer can fully enforce (a built-in module, a rule only the daemon can see,"
        " ...) is printed as FILE:LINE:COL: warning: ... (hint: the remedy).  Warnings do"
        " not change the exit code unless --strict.",
        epilog="examples:\n  kmodctl validate\n  kmodctl validate ./my-site.yaml\n"
        "  kmodctl validate --strict            CI: fail on a deny that is not enforced\n"
        "  kmodctl --root /mnt/image validate",
    ),
    VerbSpec(
        Verb.EXPLAIN,
        "show what NAME resolves to, what it would load, and the policy's verdict",
        "kmodd.cli.explain:run",
        _explain_arguments,
        description="Resolve NAME with libkmod against --root, decide it with the policy"
        " and show why.  Exit 0 if allowed, 1 if denied.",
        epilog="examples:\n  kmodctl explain net-pf-5\n  kmodctl explain algif-aead --json\n"
        "  kmodctl --root /mnt/image --kernel 6.1.0-28-amd64 explain ext4\n"
        "  kmodctl explain 'pci:v00008086d00001572sv*sd*bc02sc00i00' --source udev",
    ),
    VerbSpec(
        Verb.CMDLINE,
        "print the kernel command-line arguments (module_blacklist=, initcall_blacklist=)",
        "kmodd.cli.cmdline:run",
        _cmdline_arguments,
        description=CMDLINE_DESCRIPTION,
        epilog="examples:\n  kmodctl cmdline\n  kmodctl cmdline --json\n"
        "  kmodctl --root /mnt/image --kernel 6.12.57+deb13-amd64 cmdline\n"
        "  kmodctl cmdline --policy ./site.yaml",
    ),
    VerbSpec(
        Verb.VERIFY,
        "check on this machine that every denied module is really refused, by every path",
        "kmodd.cli.verify_report:run",
        _verify_arguments,
        description=VERIFY_DESCRIPTION,
        epilog="examples:\n  kmodctl verify\n  kmodctl verify --module ksmbd --module cramfs\n"
        "  kmodctl verify --json | jq '.modules[] | select(.enforced | not)'\n"
        "  kmodctl --root /mnt/image verify      an image: no /proc, so LOADED is '?'",
    ),
    VerbSpec(
        Verb.SCHEMA,
        "print the policy JSON Schema (draft-07) for editors",
        "kmodd.cli.schema:run",
        description="Print the JSON Schema of policy files.  Save it and add"
        " `# yaml-language-server: $schema=./kmodd-policy.schema.json` to a policy file.",
        epilog="example:\n  kmodctl schema > /etc/kmodd/kmodd-policy.schema.json",
    ),
)
