"""kmod #446 pinned on kmod 30 (this machine) and kmod 34.2 (Debian 13), on both trees.

A module with pre/post softdeps (modules.softdep) gets `ignorecmd`: its `install` line
is skipped and it is insmod'ed.  Of the two renderings issue 10 proposes, these tests
show what each kmod does (docs/kmod.md "kmod #446"):
- an empty `softdep NAME pre:` line in a file sorting before modules.softdep masks the
  module's own softdep, so `install NAME STUB` runs: by name, by alias and as a hard
  dependency of another module.  kmodd renders this.
- `alias NAME kmodd-denied-NAME` + `install kmodd-denied-NAME STUB` wins the lookup by
  name only: a dependency (modules.dep) or a modalias never goes through config
  aliases, so the module is insmod'ed there.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.kerneltree import KernelTree, Kmod34

STUB = "/usr/local/libexec/kmodd/kmodd-modprobe --deny"
MASK = "".join(
    f"softdep {m} pre:\ninstall {m} {STUB} {m}\nblacklist {m}\n" for m in ("ksmbd", "libcrc32c")
)
ALIAS = "".join(
    f"alias {m} kmodd-denied-{m}\ninstall kmodd-denied-{m} {STUB} {m}\nblacklist {m}\n"
    for m in ("ksmbd", "libcrc32c")
)
BARE = "".join(f"install {m} {STUB} {m}\nblacklist {m}\n" for m in ("ksmbd", "libcrc32c"))


def _modprobe(argv0: list[str], tree: KernelTree, conf: Path, name: str) -> list[str]:
    argv = [*argv0, "-q", "-D", "-d", str(tree.dirname), "-S", tree.release, "-C", str(conf)]
    proc = subprocess.run([*argv, "--", name], capture_output=True, text=True, check=False)
    return [line.strip() for line in proc.stdout.splitlines()]


def _insmods(lines: list[str]) -> set[str]:
    out = set()
    for line in lines:
        if line.startswith("insmod "):
            out.add(line.split()[1].rsplit("/", 1)[1].split(".", 1)[0].replace("-", "_"))
    return out


@pytest.fixture(params=["kmod30", "kmod34"])
def modprobe(request: pytest.FixtureRequest) -> list[str]:
    if request.param == "kmod30":
        return ["modprobe"]
    kmod34: Kmod34 = request.getfixturevalue("kmod34")
    return kmod34.argv()


@pytest.fixture(params=["debian12", "debian13"])
def tree(request: pytest.FixtureRequest) -> KernelTree:
    name = "kernel_tree" if request.param == "debian12" else "trixie_tree"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


def _conf(tmp_path: Path, text: str) -> Path:
    conf = tmp_path / "conf"
    conf.mkdir(exist_ok=True)
    (conf / "00-kmodd.conf").write_text(text)
    return conf


def test_install_alone_is_skipped_for_a_softdep_module(
    modprobe: list[str], tree: KernelTree, tmp_path: Path
) -> None:
    lines = _modprobe(modprobe, tree, _conf(tmp_path, BARE), "ksmbd")
    assert "ksmbd" in _insmods(lines), lines  # kmod #446 itself


def test_softdep_mask_makes_install_run_everywhere(
    modprobe: list[str], tree: KernelTree, tmp_path: Path
) -> None:
    conf = _conf(tmp_path, MASK)
    by_name = _modprobe(modprobe, tree, conf, "ksmbd")
    assert f"install {STUB} ksmbd" in by_name
    assert "ksmbd" not in _insmods(by_name)
    as_dep = _modprobe(modprobe, tree, conf, "xfs")  # xfs needs libcrc32c (modules.dep)
    assert f"install {STUB} libcrc32c" in as_dep
    assert "libcrc32c" not in _insmods(as_dep)
    assert _modprobe(modprobe, tree, conf, "fs-btrfs")  # btrfs itself still loads


def test_config_alias_holds_by_name_only(
    modprobe: list[str], tree: KernelTree, tmp_path: Path
) -> None:
    conf = _conf(tmp_path, ALIAS)
    assert _modprobe(modprobe, tree, conf, "ksmbd") == [f"install {STUB} ksmbd"]
    assert "libcrc32c" in _insmods(_modprobe(modprobe, tree, conf, "xfs"))
