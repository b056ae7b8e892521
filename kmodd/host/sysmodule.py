"""Which modules are in the kernel now, as /sys/module shows them.

/sys/module/NAME/initstate exists for a loadable module from the moment it is being
loaded ("coming", "live", "going") and never for built-in code (which has /sys/module/NAME
only when it has parameters), so one stat per name answers "is it loaded" without reading
all of /proc/modules.  Names are kmod's normalized form ('-' → '_').
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

SYS_MODULE = Path("/sys/module")


def loaded(names: Iterable[str], sys_module: Path = SYS_MODULE) -> tuple[str, ...]:
    """Those of NAMES (module names) that are loaded modules right now, in order."""
    out = []
    for name in dict.fromkeys(names):
        normalized = name.replace("-", "_")
        if "/" in normalized or normalized.startswith("."):
            continue  # never a module name; never a path outside sys_module
        if os.path.exists(sys_module / normalized / "initstate"):  # noqa: PTH110 -- one stat
            out.append(name)
    return tuple(out)
