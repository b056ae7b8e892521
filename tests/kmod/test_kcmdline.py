"""The kernel command line as libkmod reads it (oracle: tests/oracle/test_cmdline.py)."""

from __future__ import annotations

from pathlib import Path

from kmodd.kmod.kcmdline import cmdline_lines, read_host_cmdline
from kmodd.kmod.provenance import Provenance


def _render(text: str) -> list[str]:
    return [f"{ln.directive} {ln.target} {ln.value}".rstrip() for ln in cmdline_lines(text)]


def test_options_and_blacklists() -> None:
    assert _render("quiet a-b.p=1 modprobe.blacklist=x,y-z nomodule c.flag\n") == [
        "options a_b p=1",
        "blacklist x",
        "blacklist y-z",  # not normalized by kmod 30: it never matches module y_z
        "options c flag",
    ]


def test_quoting() -> None:
    assert _render('e.x="a b" "v.p=c d" f.q="1"') == [
        'options e x="a b"',
        'options v p="c d"',  # grub's form, re-quoted as kmod does
        'options f q="1"',
    ]


def test_dropped_tokens() -> None:
    assert _render('a.b.c=1 x=1.y br[.x=1 mid"q.x=1 s.w=2 "u.v=3 t.u=4') == ["options t u=4"]


def test_all_lines_point_at_proc_cmdline() -> None:
    line = cmdline_lines("m.p=1")[0]
    assert line.location() == "/proc/cmdline:1" and line.text == "m.p=1"


def test_provenance_appends_cmdline_after_files(tmp_path: Path) -> None:
    (tmp_path / "a.conf").write_text("options m from_file=1\n")
    prov = Provenance([tmp_path], kernel_cmdline="m.from_cmdline=2 modprobe.blacklist=m")
    assert [ln.location().split("/")[-1] for ln in prov.for_module("m")] == [
        "a.conf:1",
        "cmdline:1",
        "cmdline:1",
    ]
    assert prov.is_blacklisted("m")
    assert Provenance([tmp_path]).for_module("m")[0].value == "from_file=1"


def test_host_cmdline_is_readable() -> None:
    assert read_host_cmdline() == Path("/proc/cmdline").read_text()
    assert read_host_cmdline("/nonexistent") == ""
