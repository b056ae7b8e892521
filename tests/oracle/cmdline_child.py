"""Run inside `unshare --mount`: bind a fake /proc/cmdline, then compare both sides.

kmod reads /proc/cmdline unconditionally; a private mount namespace is the only way to
show both kmodd and modprobe the same *chosen* command line.  Prints one JSON object:
{"agree": n, "total": n, "diffs": [...], "samples": {name: -D lines}}.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kmodd.kmod.context import KmodContext
from kmodd.kmod.kcmdline import cmdline_lines
from kmodd.kmod.model import ConfigLine
from tests.oracle.modprobe import Oracle, render_d, render_r, separator_file


def _render(line: ConfigLine) -> str:
    if line.directive == "blacklist":
        return f"blacklist {line.target}"
    return f"options {line.target} {line.value}"


def main(argv: list[str]) -> int:
    fake, root, release, tmp, *names = argv
    subprocess.run(["mount", "--bind", fake, "/proc/cmdline"], check=True)
    config = (str(Path(tmp) / "empty"), str(separator_file(Path(tmp))))
    Path(config[0]).mkdir(exist_ok=True)
    # kmod's -d takes the dir above lib/modules: ROOT/usr on a merged-/usr (Debian 13) tree
    base = Path(root) if (Path(root) / "lib/modules").is_dir() else Path(root) / "usr"
    oracle = Oracle(base, release, config)
    their_r, their_d = oracle.run("-R", names), oracle.run("-D", names)
    diffs = []
    samples = {}
    with KmodContext(root, release, config_paths=config) as ctx:
        for name in names:
            res = ctx.resolve(name)
            if render_r(res) != their_r[name] or render_d(res) != their_d[name]:
                diffs.append([name, render_d(res), their_d[name]])
            samples[name] = list(render_d(res))
    agree = len(names) - len(diffs)
    show = ["modprobe", "-c", "-d", root, "-S", release, "-C", config[0]]
    shown = subprocess.run(show, capture_output=True, text=True, check=True).stdout
    config_lines = shown.split("# End of configuration files")[0].split("\n")
    ours = [_render(ln) for ln in cmdline_lines(Path("/proc/cmdline").read_text())]
    report = {"agree": agree, "total": len(names), "diffs": diffs, "samples": samples}
    report |= {"show_config": [ln for ln in config_lines if ln], "cmdline_lines": ours}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
