"""Both sides under a chosen kernel command line (a private mount namespace)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import root_required
from tests.kerneltree import REPO_ROOT, KernelTree
from tests.oracle.names import request_names

pytestmark = [pytest.mark.oracle, pytest.mark.root, root_required]

# Blacklist through the cmdline (names kept unnormalized, empty entries kept), options
# with quoting in both grub forms, a name with a dash, and tokens kmod drops: a second
# dot, '=' before '.', a bad bracket, a bare word, and a stray quote that swallows
# everything up to the next quote.
FAKE_CMDLINE = (
    "quiet modprobe.blacklist=appletalk,loop modprobe.blacklist=dccp dummy.numdummies=5 "
    'ext4.x="a b" "vfat.p=c d" crc32c-intel.foo=1 bad.na.me=2 nomodule '
    "modprobe.blacklist=crc32c-intel,,x modprobe.blacklist x=1.y br[.x=1 q.flag "
    'a"b.c=d swallowed.by=quote "un.closed=1 2\tz.t=3\n'
)


def test_fake_cmdline_agrees(kernel_tree: KernelTree, tmp_path: Path) -> None:
    fake = tmp_path / "cmdline"
    fake.write_text(FAKE_CMDLINE)
    names = [
        *request_names(kernel_tree.module_dir),
        *["dummy", "loop", "ext4", "vfat", "crc32c-intel", "crc32c", "dccp", "appletalk", "bad"],
    ]
    argv = ["unshare", "--mount", "--propagation", "private", "--"]
    argv += [sys.executable, "-m", "tests.oracle.cmdline_child", str(fake)]
    argv += [str(kernel_tree.root), kernel_tree.release, str(tmp_path), *names]
    proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    print(f"fake /proc/cmdline: {result['agree']}/{result['total']} names agree")
    assert result["diffs"] == []
    # kmodd.kmod.kcmdline reproduces every entry libkmod derives (modprobe -c shows them)
    # (-c prints all blacklists, then all options; softdeps come from modules.softdep)
    for directive in ("blacklist", "options"):
        ours = [ln for ln in result["cmdline_lines"] if ln.startswith(directive + " ")]
        theirs = [ln for ln in result["show_config"] if ln.startswith(directive + " ")]
        assert ours == theirs, directive
    print(f"fake /proc/cmdline: {len(result['cmdline_lines'])} config entries agree")
    samples = result["samples"]
    # The fake command line must really have been in effect:
    assert samples["net-pf-5"] == []  # appletalk blacklisted via an alias
    assert samples["dummy"][0].endswith("numdummies=5 ")
    assert 'x="a b"' in samples["ext4"][-1]
    assert "foo=1" in samples["crc32c-intel"][0]
    assert 'p="c d"' in samples["vfat"][-1]  # grub's mangled quoting, re-quoted
