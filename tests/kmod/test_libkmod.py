"""The ctypes binding: references released, errors typed, kmod's own fnmatch."""

from __future__ import annotations

import ctypes
import shutil
from pathlib import Path

import pytest

from kmodd.errors import KmoddError
from kmodd.kmod import libkmod
from tests.kmod.conftest import TinyTree, write_conf


def _open(tree: TinyTree, conf: Path | None = None) -> int:
    return libkmod.new_context(str(tree.module_dir), () if conf is None else (str(conf),))


def test_every_reference_is_released(tiny_tree: TinyTree, tmp_path: Path) -> None:
    # Each kmod_module holds a reference on its context: the context is only freed by
    # our single unref when no module reference leaked.
    conf = tmp_path / "conf"
    write_conf(conf, "a.conf", "softdep vfat pre: msdos\ninstall loop /bin/true\n")
    ctx = _open(tiny_tree, conf)
    for request in ("net-pf-5", "ext4", "fs-vfat", "loop", "crc32c", "nosuch", "a[b"):
        with libkmod.lookup(ctx, request) as mods:
            for mod in mods:
                libkmod.probe_dry_run(mod)
                libkmod.dependencies(mod)
                libkmod.softdeps(mod)
                libkmod.options(mod)
    with libkmod.module_by_name(ctx, "ext4") as ext4:
        assert ext4 is not None
        assert libkmod.info(ext4)
    libkmod.dump_index(ctx, libkmod.Index.MODULES_ALIAS)
    libkmod.config_items(ctx, "softdeps")
    assert libkmod.free_context(ctx) is True


def test_a_leaked_module_reference_is_detected(tiny_tree: TinyTree) -> None:
    # The negative control for the test above: the check can fail.
    ctx = _open(tiny_tree)
    mod = ctypes.c_void_p()
    assert libkmod.lib().kmod_module_new_from_name(ctx, b"ext4", ctypes.byref(mod)) == 0
    assert libkmod.free_context(ctx) is False
    libkmod.lib().kmod_module_unref(mod)  # the last reference frees the context too


def test_released_even_when_the_body_raises(tiny_tree: TinyTree) -> None:
    ctx = _open(tiny_tree)
    with pytest.raises(RuntimeError), libkmod.lookup(ctx, "net-pf-5") as mods:
        assert mods
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError), libkmod.module_by_name(ctx, "ext4"):
        raise RuntimeError("boom")
    assert libkmod.free_context(ctx) is True


def test_dry_run_reports_what_modprobe_D_prints(tiny_tree: TinyTree) -> None:
    ctx = _open(tiny_tree)
    try:
        with libkmod.lookup(ctx, "net-pf-5") as mods:
            assert [libkmod.name(m) for m in mods] == ["appletalk"]
            rc, actions = libkmod.probe_dry_run(mods[0])
        assert rc == 0
        assert [a.module for a in actions] == ["llc", "psnap", "appletalk"]
        assert all(a.path and Path(a.path).is_file() and not a.install for a in actions)
    finally:
        libkmod.free_context(ctx)


def test_missing_index_is_a_typed_error(tiny_tree: TinyTree, tmp_path: Path) -> None:
    moddir = tmp_path / "lib/modules" / tiny_tree.release
    shutil.copytree(tiny_tree.module_dir, moddir)
    (moddir / "modules.builtin.alias.bin").unlink()
    ctx = libkmod.new_context(str(moddir), ())
    try:
        with pytest.raises(libkmod.LibkmodError, match="MODULES_BUILTIN_ALIAS"):
            libkmod.dump_index(ctx, libkmod.Index.MODULES_BUILTIN_ALIAS)
        assert "alias net_pf_5 appletalk" in libkmod.dump_index(ctx, libkmod.Index.MODULES_ALIAS)
    finally:
        libkmod.free_context(ctx)


def test_unindexed_directory_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(libkmod.LibkmodError) as info:
        libkmod.new_context(str(tmp_path), ())
    assert info.value.hint is not None


def test_missing_library_is_a_typed_error_with_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(libkmod, "_LIB", None)
    monkeypatch.setattr(libkmod, "LIBRARY", "libkmod-does-not-exist.so.9")
    with pytest.raises(libkmod.LibkmodError) as info:
        libkmod.lib()
    assert isinstance(info.value, KmoddError)
    assert info.value.hint is not None
    assert "libkmod2" in info.value.hint


def test_config_iterators_are_normalized_and_in_parse_order(
    tiny_tree: TinyTree, tmp_path: Path
) -> None:
    conf = tmp_path / "conf"
    write_conf(conf, "b.conf", "alias my-alias dummy\nblacklist crc32c-intel\n")
    write_conf(conf, "a.conf", "options dummy numdummies=2\nalias first dummy\n")
    ctx = _open(tiny_tree, conf)
    try:
        assert libkmod.config_items(ctx, "aliases") == (("first", "dummy"), ("my_alias", "dummy"))
        assert libkmod.config_items(ctx, "blacklists") == (("crc32c_intel", ""),)
        # kmod appends MOD.PARAM=VAL options of the host's /proc/cmdline (always read)
        assert libkmod.config_items(ctx, "options")[0] == ("dummy", "numdummies=2")
        assert libkmod.config_items(ctx, "install") == ()
    finally:
        libkmod.free_context(ctx)


@pytest.mark.parametrize(
    ("pattern", "text", "matches"),
    [
        ("net_pf_5", "net_pf_5", True),
        ("pci:v*d*", "pci:v1/d2", True),  # flags 0: '*' matches '/'
        ("tty_ldisc_[0-9]", "tty_ldisc_7", True),
        ("[!a]x", "bx", True),
        ("[!a]x", "ax", False),
        ("Ext4", "ext4", False),  # case-sensitive
    ],
)
def test_fnmatch_is_libcs(pattern: str, text: str, matches: bool) -> None:
    assert libkmod.fnmatch(pattern, text) is matches
