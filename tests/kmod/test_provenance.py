"""The modprobe.d provenance reader: kmod's file, line and matching rules."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kmodd.kmod import libkmod, provenance
from kmodd.kmod.context import KmodContext
from kmodd.kmod.model import ConfigLine
from kmodd.kmod.names import underscores
from kmodd.kmod.provenance import BadLine, Provenance, logical_lines, parse_line
from tests.kerneltree import Kmod34
from tests.kmod.conftest import TinyTree, write_conf


def test_logical_lines_join_and_escape() -> None:
    text = "a \\\n  b\nc\\d\\\\e\n\n#x \\\nswallowed\nlast"
    assert list(logical_lines(text)) == [
        (1, "a   b"),  # the continuation keeps the next line's indentation
        (3, "cd\\e"),  # other backslashes keep only the next character
        (4, ""),
        (5, "#x swallowed"),  # a comment continued swallows the next line
        (7, "last"),  # no final newline
    ]


def test_a_backslash_ending_the_file_follows_the_kmod_version() -> None:
    text = "alias a b\\"
    assert list(logical_lines(text, eof_byte=True)) == [(1, "alias a b\udcff")]  # kmod 30
    assert list(logical_lines(text, eof_byte=False)) == [(1, "alias a b")]  # kmod 34


def _dump(argv: list[str], conf: Path) -> list[str]:
    out = subprocess.run(
        [*argv, "-c", "-C", str(conf)], capture_output=True, check=False, timeout=30
    ).stdout
    return [os.fsdecode(ln) for ln in out.splitlines() if ln.startswith(b"alias kmodd")]


def test_eof_probe_matches_kmod_30_and_34(kmod34: Kmod34, tmp_path: Path) -> None:
    """The real behaviours the probe tells apart: Debian 12's modprobe (kmod 30) keeps the
    0xff, Debian 13's (kmod 34) does not; the loaded libkmod's probe says which it is."""
    conf = tmp_path / "x.conf"
    conf.write_bytes(b"alias kmodd-eof vfat\\")
    assert _dump(kmod34.argv(), conf) == ["alias kmodd_eof vfat"]
    version = subprocess.run(
        ["modprobe", "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    ours = _dump(["modprobe"], conf)  # this machine's kmod, the libkmod kmodd loads
    if "kmod version 30" in version:
        assert ours == ["alias kmodd_eof vfat\udcff"]
    assert libkmod.stores_eof_after_backslash() is ours[0].endswith("\udcff")


def test_dot_alias_probe_matches_kmod_30_and_34(kmod34: Kmod34, tmp_path: Path) -> None:
    """kmod 30 reads NAME.alias files of a config dir, kmod 34.2 only NAME.conf (the
    Debian 13 failure of the garbage fuzz); the probe says which the loaded libkmod does."""
    (tmp_path / "x.alias").write_text("alias kmodd-dot-alias vfat\n")
    assert _dump(kmod34.argv(), tmp_path) == []
    ours = _dump(["modprobe"], tmp_path)
    assert libkmod.reads_dot_alias_files() is (ours == ["alias kmodd_dot_alias vfat"])
    prov = Provenance([str(tmp_path)], tmp_path / "no-module-dir")
    assert [ln.target for ln in prov.of("alias")] == (["kmodd_dot_alias"] if ours else [])


def test_provenance_reads_a_dangling_backslash_as_libkmod_does(
    tiny_tree: TinyTree, tmp_path: Path
) -> None:
    conf = tmp_path / "x.conf"
    conf.write_bytes(b"alias kmodd-first vfat\nalias kmodd-eof msdos\\")
    with KmodContext(tiny_tree.root, tiny_tree.release, config_paths=[conf]) as ctx:
        prov = Provenance([str(conf)], tiny_tree.module_dir)
        assert [(ln.target, ln.value) for ln in prov.of("alias")] == list(ctx.config_aliases())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("net-pf-5", "net_pf_5"),
        ("ab[0-9]-x", "ab[0-9]_x"),
        ("bad]x", None),
        ("open[x", None),
        ("a-[b-c]-d", "a_[b-c]_d"),
    ],
)
def test_underscores(text: str, expected: str | None) -> None:
    assert underscores(text) == expected


def test_parse_line_forms() -> None:
    line = parse_line("f", 3, "options dummy\t x=1\ty=2")
    assert isinstance(line, ConfigLine)
    assert (line.directive, line.target, line.value, line.location()) == (
        "options",
        "dummy",
        " x=1 y=2",  # one separator consumed, the rest verbatim, tabs as spaces
        "f:3",
    )
    alias = parse_line("f", 1, "alias  my-alias  some-mod extra tokens")
    assert isinstance(alias, ConfigLine)
    assert (alias.target, alias.value) == ("my_alias", "some_mod")
    for bad in ("  # indented", "alias onlyone", "options mod", "bogus x", "alias a]b c"):
        assert isinstance(parse_line("f", 1, bad), BadLine), bad
    assert parse_line("f", 1, "# comment") is None
    assert parse_line("f", 1, " \t ") is None


def test_files_order_override_and_masking(tmp_path: Path) -> None:
    high, low = tmp_path / "high", tmp_path / "low"
    write_conf(high, "50-x.conf", "alias a high\n")
    write_conf(low, "50-x.conf", "alias a low\n")
    write_conf(low, "10-y.conf", "alias b low\n")
    write_conf(low, "masked.conf", "alias c low\n")
    write_conf(low, "kmod30.alias", "alias d low\n")
    (high / "masked.conf").symlink_to(os.devnull)
    write_conf(high, ".hidden.conf", "alias e high\n")
    write_conf(high, "notes.txt", "alias f high\n")
    (high / "dir.conf").mkdir()
    prov = Provenance([high, low])
    dot_alias = libkmod.reads_dot_alias_files()  # kmod 30 reads NAME.alias, kmod 34 not
    alias_file = ["kmod30.alias"] if dot_alias else []
    assert [p.name for p in prov.files] == ["10-y.conf", "50-x.conf", *alias_file, "masked.conf"]
    assert [(ln.target, ln.value) for ln in prov.lines] == [
        ("b", "low"),
        ("a", "high"),
        *([("d", "low")] if dot_alias else []),
    ]


def test_matching_rules(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    write_conf(
        conf,
        "a.conf",
        "install crc* /bin/first\n"
        "install crc32c /bin/second\n"
        "alias my-net dummy\n"
        "alias my-* loop\n"
        "options my_net x=1\n"
        "options dummy y=2\n"
        "blacklist dummy\n"
        "softdep dum* pre: a\n"
        "softdep dummy pre: b\n"
        "install my-net /bin/false\n",
    )
    prov = Provenance([conf])
    first = prov.install_line("crc32c")
    assert first is not None and first.value == "/bin/first"
    assert [ln.value for ln in prov.aliases_matching("my-net")] == ["dummy", "loop"]
    assert [ln.target for ln in prov.aliases_onto("dummy")] == ["my_net"]
    softdep = prov.softdep_line("dummy")
    assert softdep is not None and softdep.target == "dum*"
    assert prov.is_blacklisted("dummy") and not prov.is_blacklisted("loop")
    assert [ln.line for ln in prov.for_module("dummy")] == [3, 6, 7, 8]
    assert [ln.line for ln in prov.for_request("my-net", ["dummy"])] == [3, 4, 5, 6, 7, 8, 10]
    assert prov.for_request("a]b") == ()


def test_modules_softdep_joins_the_list(tmp_path: Path) -> None:
    moddir = tmp_path / "lib/modules/x"
    write_conf(moddir, "modules.softdep", "softdep ext4 pre: crypto-crc32c\n")
    write_conf(tmp_path / "conf", "z.conf", "softdep ext4 pre: other\n")
    prov = Provenance([tmp_path / "conf"], moddir)
    line = prov.softdep_line("ext4")
    assert line is not None and line.path.endswith("modules.softdep") and line.line == 1


def test_bad_and_oversized_files_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_conf(tmp_path, "a.conf", "alias ok dummy\nnonsense here\n")
    write_conf(tmp_path, "b.conf", "x" * 100)
    monkeypatch.setattr(provenance, "MAX_FILE_BYTES", 50)
    prov = Provenance([tmp_path])
    assert [str(b).split("/")[-1] for b in prov.bad_lines] == [
        "a.conf:2: ignoring bad line starting with 'nonsense'",
        "b.conf:0: larger than 50 bytes: not read",
    ]
    assert len(prov.lines) == 1
