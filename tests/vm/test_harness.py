"""The boot harness itself, with no kmodd in the way: a trivial shell helper as
kernel.modprobe shows what the real kernel passes to it, and that results, exit status and
the hard timeout work.  If these fail, the scenario failures are the harness's fault."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import root_required
from tests.kerneltree import KernelTree
from tests.vm.harness import VMResult, boot

pytestmark = [pytest.mark.vm, root_required, pytest.mark.timeout(600)]

# The helper records its argv and environment, then does what the kernel asked.
SMOKE = r"""
helper="$KMODD_VM_SHARED/helper.sh"
cat > "$helper" <<EOF
#!/bin/sh
{ echo "argv=\$*"; env; } > "$KMODD_VM_OUT/helper.txt"
exec /sbin/modprobe "\$@"
EOF
chmod 755 "$helper"
echo "$helper" > /proc/sys/kernel/modprobe
python3 -IS tests/vm/trigger.py socket:5:2 > "$KMODD_VM_OUT/trigger.txt"
{ printf '{"release": "%s", "modules": "' "$(uname -r)"
  cut -d' ' -f1 /proc/modules | tr '\n' ' '
  printf '", "avx2_cpus": %s}\n' "$(grep -c -w avx2 /proc/cpuinfo)"; } > "$KMODD_VM_OUT/smoke.json"
exit 3
"""


@pytest.fixture(scope="module")
def smoke(kernel_tree: KernelTree) -> VMResult:
    return boot(SMOKE, tree=kernel_tree, timeout_s=300)


def test_guest_runs_the_debian_kernel_and_returns_the_script_status(
    smoke: VMResult, kernel_tree: KernelTree
) -> None:
    assert not smoke.timed_out, smoke.tail()
    assert smoke.returncode == 3, smoke.tail()
    assert smoke.result("smoke")["release"] == kernel_tree.release


def test_kernel_execs_the_helper_like_request_module_does(smoke: VMResult) -> None:
    text = smoke.files["helper.txt"]
    lines = text.splitlines()
    assert lines[0] == "argv=-q -- net-pf-5"
    # sh adds PWD itself; the kernel gives exactly HOME, TERM and PATH.
    env = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
    env.pop("PWD", None)
    assert env == {"HOME": "/", "TERM": "linux", "PATH": "/sbin:/usr/sbin:/bin:/usr/bin"}


def test_the_real_modprobe_loads_the_module_and_its_dependencies(smoke: VMResult) -> None:
    loaded = smoke.result("smoke")["modules"].split()
    assert {"appletalk", "psnap", "llc"} <= set(loaded), loaded


def test_the_guest_cpu_has_no_avx2(smoke: VMResult) -> None:
    """harness.TCG_CPU reached qemu: glibc's AVX2 functions are slow under TCG."""
    assert smoke.result("smoke")["avx2_cpus"] == 0


def test_hard_timeout_kills_the_whole_vm(kernel_tree: KernelTree) -> None:
    result = boot("sleep 1000\n", tree=kernel_tree, timeout_s=15)
    assert result.timed_out
    assert result.returncode == -9
    leftovers = [
        proc.name
        for proc in Path("/proc").iterdir()
        if proc.name.isdigit() and result.vm_id in _cmdline(proc / "cmdline")
    ]
    assert leftovers == []


def _cmdline(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return ""
