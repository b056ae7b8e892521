"""The provenance reader against `modprobe -c` (and libkmod's own config iterators)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kmodd.kmod import libkmod
from kmodd.kmod.context import KmodContext, config_dirs
from kmodd.kmod.provenance import Provenance
from tests.kerneltree import KernelTree
from tests.oracle.test_resolution import CORPUS_NAMES

pytestmark = pytest.mark.oracle

CORPUS = Path(__file__).resolve().parents[1] / "data/modprobe.d"
SECTIONS = ("blacklist", "install", "remove", "alias", "options", "softdep")
END = "# End of configuration files. Dumping indexes now:"


def _show_config(tree: KernelTree, config: tuple[str, ...]) -> dict[str, list[str]]:
    argv = ["modprobe", "-c", "-d", str(tree.dirname), "-S", tree.release]
    for path in config:
        argv += ["-C", path]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    sections: dict[str, list[str]] = {name: [] for name in SECTIONS}
    for line in out.split(f"\n{END}")[0].splitlines():
        directive = line.split(" ", 1)[0]
        sections[directive].append(line)
    return sections


def _ours(prov: Provenance) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {name: [] for name in SECTIONS}
    for ln in prov.lines:
        if ln.directive == "blacklist":
            text = f"blacklist {ln.target}"
        elif ln.directive == "softdep":
            # kmod 30 prints softdeps re-assembled, and drops a space ("pre: apost: b")
            text = f"softdep {ln.target}"
        else:
            text = f"{ln.directive} {ln.target} {ln.value}"
        sections[ln.directive].append(text)
    return sections


def _cmdline_tail(line: str) -> bool:
    """A line libkmod derived from /proc/cmdline (appended after all files)."""
    cmdline = Path("/proc/cmdline").read_text()
    parts = line.split(" ", 2)
    if parts[0] == "blacklist":
        return "modprobe.blacklist=" in cmdline
    return parts[0] == "options" and f"{parts[1]}.{parts[2].split('=')[0]}" in cmdline


def _check(tree: KernelTree, config: tuple[str, ...], label: str) -> None:
    prov = Provenance(config, tree.module_dir)
    theirs = _show_config(tree, config)
    ours = _ours(prov)
    total = agree = 0
    for section in SECTIONS:
        mine, kmods = ours[section], theirs[section]
        if section == "softdep":
            kmods = [" ".join(line.split(" ", 2)[:2]) for line in kmods]
        total += len(kmods)
        agree += sum(a == b for a, b in zip(mine, kmods, strict=False))
        assert kmods[: len(mine)] == mine, section
        assert all(_cmdline_tail(line) for line in kmods[len(mine) :]), section
        agree += len(kmods) - len(mine)
    print(f"{label} modprobe -c: {agree}/{total} lines agree ({len(prov.lines)} from files)")
    assert agree == total


def test_corpus_against_show_config(kernel_tree: KernelTree) -> None:
    _check(kernel_tree, config_dirs(CORPUS), "corpus")


def test_debian_against_show_config(kernel_tree: KernelTree, tmp_path: Path) -> None:
    for rel in ("etc/modprobe.d", "lib/modprobe.d"):
        if (Path("/") / rel).is_dir():
            shutil.copytree(Path("/") / rel, tmp_path / rel, symlinks=True)
    _check(kernel_tree, config_dirs(tmp_path), "debian")


def test_values_match_libkmod_iterators(kernel_tree: KernelTree) -> None:
    # Softdep values included: libkmod's iterator re-assembles them, so compare tokens.
    config = config_dirs(CORPUS)
    prov = Provenance(config, kernel_tree.module_dir)
    with KmodContext(kernel_tree.root, kernel_tree.release, config_paths=config) as ctx:
        assert [(ln.target, ln.value) for ln in prov.of("alias")] == list(ctx.config_aliases())
        assert [(ln.target, ln.value) for ln in prov.of("install")] == list(ctx.config_installs())
        assert [(ln.target, ln.value) for ln in prov.of("remove")] == list(ctx.config_removes())
        assert [ln.target for ln in prov.of("blacklist")] == list(ctx.config_blacklists())[
            : len(prov.of("blacklist"))
        ]
        opts = list(ctx.config_options())
        assert [(ln.target, ln.value) for ln in prov.of("options")] == opts[
            : len(prov.of("options"))
        ]
        softdeps = list(ctx.config_softdeps())
        assert [ln.target for ln in prov.of("softdep")] == [k for k, _ in softdeps]


def test_first_pick_matches_libkmod(kernel_tree: KernelTree) -> None:
    # What the runtime's conflict detection relies on: the install/remove/softdep line
    # provenance says kmod picks first is the one libkmod applies, for every module.
    config = config_dirs(CORPUS)
    prov = Provenance(config, kernel_tree.module_dir)
    with KmodContext(kernel_tree.root, kernel_tree.release, config_paths=config) as ctx:
        names = [*ctx.module_names(), *CORPUS_NAMES]
        for name in names:
            with libkmod.module_by_name(ctx.ctx, name, lookup_builtin=False) as mod:
                assert mod is not None
                install, remove = prov.install_line(name), prov.remove_line(name)
                assert libkmod.install_commands(mod) == (install.value if install else None)
                assert libkmod.remove_commands(mod) == (remove.value if remove else None)
            aliases = prov.aliases_matching(name)
            if aliases:  # the config stage wins: kmod returns exactly these, in order
                assert ctx.resolve(name).modules == tuple(ln.value for ln in aliases), name
    print(f"first-pick install/remove lines: {len(names)}/{len(names)} names agree")
