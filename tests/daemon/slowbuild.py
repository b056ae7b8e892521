"""`python -m tests.daemon.slowbuild KMODD-ARGS...`: the real kmodd, whose generation builds
wait until the file named by $KMODD_TEST_BUILD_GATE exists (touching
$KMODD_TEST_BUILD_STARTED when one starts).  A slow first build on demand, with no hook in
the daemon: the same stand-in for a module tree that takes minutes under TCG
(tests/daemon/test_startup.py)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kmodd.daemon import generation, lastgood, main

GATE_ENV = "KMODD_TEST_BUILD_GATE"
STARTED_ENV = "KMODD_TEST_BUILD_STARTED"


def held(build: Callable[..., Any]) -> Callable[..., Any]:
    def slow(*args: Any, **kwargs: Any) -> Any:
        Path(os.environ[STARTED_ENV]).touch()
        gate = Path(os.environ[GATE_ENV])
        while not gate.exists():
            time.sleep(0.02)
        return build(*args, **kwargs)

    return slow


if __name__ == "__main__":
    setattr(lastgood, "build_generation", held(generation.build_generation))  # noqa: B010
    sys.exit(main.main(sys.argv[1:]))
