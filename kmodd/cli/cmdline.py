"""`kmodctl cmdline`: the kernel command-line arguments the policy implies for a tree.

modprobe.d and the helper stop loads that pass through kmod; the kernel's own switches
hold on every path and from the first instruction: `module_blacklist=` (load_module()
refuses the names, initramfs and insmod included) and `initcall_blacklist=` (the only
way to keep built-in code from initialising).  kmodd never edits a boot loader: this
verb prints the arguments and how to add them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from kmodd.cli.common import paths_from_args, print_json, wants_json
from kmodd.cli.validate import load_for
from kmodd.kmod.builtin import CmdlineArgs, Confidence, cmdline_args
from kmodd.kmod.context import KmodContext
from kmodd.paths import Paths, base_note, module_base
from kmodd.policy.coverage import rendered_modules
from kmodd.policy.engine import CompiledPolicy, Request, compile_policy, decide
from kmodd.policy.types import Mode, Source, Verdict

# x86 COMMAND_LINE_SIZE (arch/x86/include/asm/setup.h): the boot loader's whole line,
# root= and quiet included, must fit; a longer one is cut off by the kernel.
COMMAND_LINE_SIZE = 2048

APPLY = """\
to apply (kmodd never edits the boot configuration):
  GRUB (Debian):       echo 'GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX ARGS"' \\
                         > /etc/default/grub.d/90-kmodd.cfg && update-grub
  kernel-install/UKI:  append ARGS to /etc/kernel/cmdline, then reinstall the kernel
  Fedora/RHEL:         grubby --update-kernel=ALL --args="ARGS"
  rpm-ostree:          rpm-ostree kargs --append=ARG (once per argument)"""


@dataclass(frozen=True, slots=True)
class CmdlinePlan:
    args: CmdlineArgs
    left_out: tuple[str, ...]  # denied for some sources only: a kernel switch holds for all
    module_dir: str
    base: str  # the MODULE_BASES entry used


def plan(paths: Paths, policy: CompiledPolicy) -> CmdlinePlan:
    with KmodContext.from_paths(paths) as ctx:
        rendered = rendered_modules(policy, ctx) if policy.mode is Mode.ENFORCE else {}
        everywhere, left_out = [], []
        for module in sorted(rendered):
            res = ctx.resolve(module)
            if all(decide(Request(module, s), res, policy).verdict is Verdict.DENY for s in Source):
                everywhere.append(module)
            else:
                left_out.append(module)
        builtins = ctx.builtin_names()
    args = cmdline_args(paths.root, paths.release, everywhere, builtins)
    base = module_base(paths.root, paths.release)
    return CmdlinePlan(args, tuple(left_out), str(paths.module_dir), base)


def to_json(p: CmdlinePlan, policy: CompiledPolicy) -> dict[str, object]:
    line = " ".join(p.args.arguments())
    return {
        "arguments": list(p.args.arguments()),
        "length": len(line),
        "fits": len(line) < COMMAND_LINE_SIZE,
        "module_blacklist": list(p.args.module_blacklist),
        "initcall_blacklist": [
            {
                "module": i.module,
                "function": i.function,
                "confidence": str(i.confidence),
                "source": i.source,
            }
            for i in p.args.initcalls
        ],
        "left_out": list(p.left_out),
        "module_dir": p.module_dir,
        "module_dir_base": p.base,
        "mode": str(policy.mode),
        "policy_hash": policy.hash,
    }


def _print_text(p: CmdlinePlan, policy: CompiledPolicy) -> None:
    print(f"# policy {policy.hash[:12] or '-'} on {p.module_dir}{base_note(p.base)}")
    if policy.mode is not Mode.ENFORCE:
        print(f"# {policy.mode} mode: the policy implies no kernel arguments")
    arguments = p.args.arguments()
    for arg in arguments:
        print(arg)
    if not arguments and policy.mode is Mode.ENFORCE:
        print("# no module is denied for every source: nothing to add")
    line = " ".join(arguments)
    if len(line) >= COMMAND_LINE_SIZE:
        print(
            f"# warning: {len(line)} characters; the whole kernel command line must stay"
            f" under {COMMAND_LINE_SIZE} on x86: keep module_blacklist= to the modules that"
            " matter before kmodd starts (initramfs, coldplug)"
        )
    for call in p.args.initcalls:
        how = (
            f"from {call.source}"
            if call.confidence is Confidence.EXACT
            else f"by convention, unverified ({call.source}); check on the running kernel: "
            f"grep -w {call.function} /proc/kallsyms"
        )
        print(f"# {call.module} is built in: initcall {call.function} {how}")
    if p.left_out:
        shown = ", ".join(p.left_out[:8]) + (" ..." if len(p.left_out) > 8 else "")
        print(
            f"# left out, denied for some sources only ({len(p.left_out)}): {shown};"
            " a kernel switch holds for every load"
        )
    if arguments:
        print(APPLY.replace("ARGS", line if len(line) < 80 else "<the arguments above>"))


def run(args: argparse.Namespace) -> int:
    paths = paths_from_args(args)
    policy = compile_policy(load_for(args, args.policy))
    p = plan(paths, policy)
    if wants_json(args):
        print_json(to_json(p, policy))
    else:
        _print_text(p, policy)
    return 0
