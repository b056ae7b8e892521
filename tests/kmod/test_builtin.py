"""kmodd.kmod.builtin: initcall names and the kernel command-line split."""

from __future__ import annotations

from pathlib import Path

from kmodd.kmod.builtin import Confidence, cmdline_args, initcalls, initcalls_from, symbol_file
from tests.kerneltree import KernelTree

# Symbol names as include/linux/init.h's __initcall_id builds them (kmod_<modname>,
# counter, line, function, level); a System.map line is `ADDR TYPE NAME`.
MAP = """\
ffffffff81000000 T _stext
ffffffff83a4e2c8 d __initcall__kmod_algif_aead__312_560_algif_aead_init6
ffffffff83a4d010 d __initcall__kmod_zswap__401_1593_zswap_init7s
ffffffff83a4c000 d __initcall__kmod_crc32c_generic__200_94_crc32c_mod_init4
ffffffff83a4c008 d __initcall__kmod_early__1_2_setup_earlyearly
ffffffff83a4c010 t algif_aead_init
"""


def test_initcall_symbols_are_parsed() -> None:
    found = initcalls_from(MAP.splitlines())
    assert found["algif_aead"] == "algif_aead_init"
    assert found["zswap"] == "zswap_init"
    assert found["crc32c_generic"] == "crc32c_mod_init"  # not the <name>_init guess
    assert found["early"] == "setup_early"


def test_real_system_map_gives_exact_names(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot/System.map-9.9").write_text(MAP)
    calls = {c.module: c for c in initcalls(tmp_path, "9.9", ["crc32c_generic", "nosuch"])}
    assert calls["crc32c_generic"].function == "crc32c_mod_init"
    assert calls["crc32c_generic"].confidence is Confidence.EXACT
    assert calls["nosuch"].function == "nosuch_init"
    assert calls["nosuch"].confidence is Confidence.CONVENTION
    assert "no initcall symbol" in calls["nosuch"].source


def test_debian_stub_system_map_falls_back_to_the_convention(kernel_tree: KernelTree) -> None:
    """Debian ships a one-line System.map ("The real System.map is in the -dbg
    package"): kmodd says the name is a convention, never pretends it is exact."""
    path, why = symbol_file(kernel_tree.root, kernel_tree.release)
    assert path is None and "stub" in why
    (call,) = initcalls(kernel_tree.root, kernel_tree.release, ["bsg"])
    assert call.function == "bsg_init" and call.confidence is Confidence.CONVENTION


def test_cmdline_args_split_builtin_and_loadable(kernel_tree: KernelTree) -> None:
    args = cmdline_args(
        kernel_tree.root, kernel_tree.release, ["algif-aead", "bsg", "ksmbd"], {"bsg"}
    )
    assert args.module_blacklist == ("algif_aead", "ksmbd")  # '_' form, as the kernel compares
    assert [c.module for c in args.initcalls] == ["bsg"]
    assert args.arguments() == (
        "module_blacklist=algif_aead,ksmbd",
        "initcall_blacklist=bsg_init",
    )
