"""The boot step (kmodd/bootpublish.py) as kmodd-boot-publish.service runs it:
`/usr/bin/python3 -IS FILE`, verifying the last-good store the benchmark's daemon wrote
(digest of the policy, modprobe.d, the real tree's index files, the command line) and
publishing it.  Interleaved with the interpreter's own start, so the ratio compares the
same load (goal: boot_publish_ms <= 50, issue 14)."""

from __future__ import annotations

import subprocess

from bench import spawn
from bench.stats import Cmp, Figure, Goal, interleaved, ratio, summary
from bench.system import Root
from kmodd import bootpublish

GOAL_MS = 50.0


def boot_publish_figures(r: Root, runs: int) -> list[Figure]:
    runtime = r.top / "boot-runtime"  # not the daemon's: it may still be running
    argv = [spawn.PYTHON, "-IS", bootpublish.__file__, "--root", str(r.root)]
    argv += ["--kernel", r.release, "--runtime-dir", str(runtime)]
    argv += ["--cmdline", str(r.top / "cmdline"), "--modprobe-sysctl", ""]
    env = spawn.kernel_env()
    once = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if once.returncode != 0 or "published last good generation" not in once.stdout:
        raise RuntimeError(f"the boot step did not publish: {once.stdout}{once.stderr}")

    def publish() -> spawn.Run:
        result = spawn.run(argv, env)
        if result.status != 0:
            raise RuntimeError(f"{argv} exited {result.status}")
        return result

    def floor() -> spawn.Run:
        return spawn.run([spawn.PYTHON, "-IS", "-c", "pass"], env)

    samples = interleaved({"floor": floor, "publish": publish}, runs)
    base = summary("boot_python_floor_ms", [s.wall_ms for s in samples["floor"]])
    wall = summary(
        "boot_publish_ms",
        [s.wall_ms for s in samples["publish"]],
        goal=Goal(Cmp.LE, GOAL_MS),
        note="verify the store (digest of every input) and publish, `python3 -IS FILE`",
    )
    cpu = summary("boot_publish_cpu_ms", [s.cpu_ms for s in samples["publish"]])
    base = Figure(base.name, base.value, base.unit, base.low, base.high, base.runs,
                  note="`/usr/bin/python3 -IS -c pass`, the same rounds")  # fmt: skip
    return [wall, base, ratio("boot_publish_vs_floor", wall, base), cpu]
