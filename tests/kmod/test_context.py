"""KmodContext on a tiny real tree with test configuration dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kmodd.kmod import libkmod
from kmodd.kmod.context import (
    ClosedContextError,
    KmodContext,
    ModuleTreeError,
    UnknownModuleError,
    config_dirs,
)
from kmodd.kmod.model import StepKind
from kmodd.paths import make_paths
from tests.kmod.conftest import TinyTree, write_conf


def _ctx(tree: TinyTree, conf: Path, text: str = "") -> KmodContext:
    write_conf(conf, "test.conf", text)
    return KmodContext(tree.root, tree.release, config_paths=[conf])


def test_resolve_alias_to_load_set(tiny_tree: TinyTree, tmp_path: Path) -> None:
    with _ctx(tiny_tree, tmp_path) as ctx:
        res = ctx.resolve("net-pf-5")
        assert res.modules == ("appletalk",)
        assert res.load_set == ("llc", "psnap", "appletalk")
        assert all(s.kind is StepKind.INSMOD for s in res.steps)
        assert res.steps[-1].path == str(tiny_tree.module_file("net/appletalk/appletalk"))
        assert res.resolved and not res.blacklisted


def test_softdeps_come_first_and_dashes_normalize(tiny_tree: TinyTree, tmp_path: Path) -> None:
    with _ctx(tiny_tree, tmp_path) as ctx:
        # modules.softdep: ext4 pre: crypto-crc32c (both crc32c providers); deps load
        # right to left of the modules.dep line.
        assert ctx.resolve("ext4").load_set == (
            "crc32c_intel",
            "crc32c_generic",
            "jbd2",
            "mbcache",
            "crc16",
            "ext4",
        )
        assert ctx.resolve("crc32c-intel").modules == ("crc32c_intel",)
        assert ctx.resolve("crc32c").modules == ("crc32c_intel", "crc32c_generic")


def test_unresolvable_and_hostile_names(tiny_tree: TinyTree, tmp_path: Path) -> None:
    with _ctx(tiny_tree, tmp_path) as ctx:
        for name in ("nosuch", "", "a\0b", "x" * 5000, "tty-ldisc-[", "../../etc/passwd"):
            res = ctx.resolve(name)
            assert res.modules == () and res.steps == () and not res.resolved


def test_builtin_step(tiny_tree: TinyTree, tmp_path: Path) -> None:
    with _ctx(tiny_tree, tmp_path) as ctx:
        # af_packet is built into Debian's 6.1 and 6.12 (unix: only 6.1 lists it built in)
        res = ctx.resolve("net-pf-17")
        assert res.modules == ("af_packet",)
        assert [(s.module, s.kind) for s in res.steps] == [("af_packet", StepKind.BUILTIN)]


def test_config_alias_blacklist_install_options(tiny_tree: TinyTree, tmp_path: Path) -> None:
    conf = (
        "alias my-net dummy\n"
        "alias my-net loop\n"
        "blacklist loop\n"
        "options dummy numdummies=3\n"
        "install msdos /bin/echo no-msdos\n"
        "install ghost /bin/true\n"
    )
    with _ctx(tiny_tree, tmp_path, conf) as ctx:
        res = ctx.resolve("my_net")
        assert res.modules == ("dummy", "loop")
        assert res.blacklisted == ("loop",)  # alias-only blacklist, as modprobe applies it
        # kmod's merged options keep a trailing separator; host cmdline options could
        # follow for modules the host command line names (not dummy).
        assert [(s.module, s.options.strip()) for s in res.steps] == [("dummy", "numdummies=3")]
        assert ctx.resolve("loop").load_set == ("loop",)  # direct name: not blacklisted
        msdos = ctx.resolve("msdos").steps
        assert [(s.module, s.kind, s.command) for s in msdos] == [
            ("fat", StepKind.INSMOD, None),
            ("msdos", StepKind.INSTALL, "/bin/echo no-msdos"),
        ]
        ghost = ctx.resolve("ghost")
        assert ghost.modules == ("ghost",)
        assert ghost.steps[0].kind is StepKind.INSTALL


def test_softdep_suppresses_own_install(tiny_tree: TinyTree, tmp_path: Path) -> None:
    conf = "install vfat /bin/false\nsoftdep vfat pre: msdos\n"
    with _ctx(tiny_tree, tmp_path, conf) as ctx:
        steps = ctx.resolve("vfat").steps
        # fat twice: kmod 30 lists a dependency once per path that reaches it (vfat's own
        # dependency, then msdos's); `modprobe -D vfat` prints it twice too.
        assert [(s.module, s.kind) for s in steps] == [
            ("fat", StepKind.INSMOD),
            ("fat", StepKind.INSMOD),
            ("msdos", StepKind.INSMOD),
            ("vfat", StepKind.INSMOD),
        ]


def test_module_info(tiny_tree: TinyTree, tmp_path: Path) -> None:
    conf = "blacklist ext4\noptions ext4 x=1\ninstall ext4 /bin/false\n"
    with _ctx(tiny_tree, tmp_path, conf) as ctx:
        info = ctx.module_info("ext4")
        assert info.description == "Fourth Extended Filesystem"
        assert info.license == "GPL"
        assert "fs-ext4" in info.aliases
        # the order is the build's (6.1: jbd2 mbcache crc16; 6.12: jbd2 crc16 mbcache)
        assert sorted(info.depends) == ["crc16", "jbd2", "mbcache"]
        assert info.softdeps == "pre: crypto-crc32c"
        assert info.signer
        assert info.options.startswith("x=1")
        assert info.install_commands == "/bin/false"
        assert info.blacklisted and not info.builtin
        assert ("name", "ext4") in info.extra
        packet = ctx.module_info("af_packet")
        assert packet.builtin and packet.path is None and "net-pf-17" in packet.aliases
        with pytest.raises(UnknownModuleError) as err:
            ctx.module_info("net-pf-5")
        assert err.value.hint


def test_lists(tiny_tree: TinyTree, tmp_path: Path) -> None:
    with _ctx(tiny_tree, tmp_path, "alias x dummy\nsoftdep loop post: dummy\n") as ctx:
        names = ctx.module_names()
        assert "crc32c_intel" in names and "af_packet" in names and len(names) == len(set(names))
        assert "af_packet" in ctx.builtin_names() and "ext4" not in ctx.builtin_names()
        assert ("net_pf_5", "appletalk") in ctx.alias_patterns()
        assert ctx.builtin_alias_patterns()
        assert ctx.config_aliases() == (("x", "dummy"),)
        # modules.softdep is parsed as a config file named "modules.softdep": it sorts
        # before "test.conf".
        assert ctx.config_softdeps()[-1] == ("loop", "post: dummy")
        assert ctx.config_softdeps()[0] == ("ext4", "pre: crypto-crc32c")
        assert ctx.blacklist() == frozenset()


def test_cache_and_close(tiny_tree: TinyTree, tmp_path: Path) -> None:
    ctx = _ctx(tiny_tree, tmp_path)
    assert ctx.resolve("ext4") is ctx.resolve("ext4")
    ctx.module_info("ext4")
    ctx.alias_patterns()
    assert ctx.close() is True  # no leaked reference kept the libkmod context alive
    assert ctx.close() is True
    with pytest.raises(ClosedContextError):
        ctx.resolve("loop")


def test_cache_is_bounded(tiny_tree: TinyTree, tmp_path: Path) -> None:
    write_conf(tmp_path, "test.conf", "")
    with KmodContext(tiny_tree.root, tiny_tree.release, config_paths=[tmp_path], cache_size=3) as c:
        for i in range(10):
            c.resolve(f"nosuch{i}")
        assert len(c._cache) == 3


def test_cache_size_zero_disables_caching(tiny_tree: TinyTree, tmp_path: Path) -> None:
    write_conf(tmp_path, "test.conf", "")
    with KmodContext(tiny_tree.root, tiny_tree.release, config_paths=[tmp_path], cache_size=0) as c:
        first = c.resolve("loop")
        assert c.resolve("loop") == first
        assert c._cache == {}


def test_validate_sees_config_dir_changes(tiny_tree: TinyTree, tmp_path: Path) -> None:
    with _ctx(tiny_tree, tmp_path) as ctx:
        assert ctx.validate() is libkmod.Resources.OK
        st = tmp_path.stat()
        os.utime(tmp_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert ctx.validate() is libkmod.Resources.MUST_RECREATE


def test_missing_tree_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(ModuleTreeError) as err:
        KmodContext(tmp_path, "6.1.0-0-amd64")
    assert "depmod" in (err.value.hint or "")


def test_default_config_is_the_five_dirs_under_root(tiny_tree: TinyTree) -> None:
    paths = make_paths(tiny_tree.root, tiny_tree.release, runtime_dir="/nonexistent")
    with KmodContext.from_paths(paths) as ctx:
        assert ctx.config_paths == config_dirs(tiny_tree.root)
        assert ctx.config_paths[0] == str(tiny_tree.root / "etc/modprobe.d")
        assert ctx.resolve("net-pf-5").modules == ("appletalk",)


def test_warm_fills_the_cache(tiny_tree: TinyTree, tmp_path: Path) -> None:
    with _ctx(tiny_tree, tmp_path) as ctx:
        assert ctx.warm(["net-pf-5", "nosuch", "ext4"]) == 2
        assert set(ctx._cache) == {"net-pf-5", "nosuch", "ext4"}
