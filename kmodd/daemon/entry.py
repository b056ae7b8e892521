"""The `kmodd` command: ask systemd for time first, then import the daemon.

Importing kmodd.daemon.main (pydantic, yaml, libkmod bindings) costs ~0.16 s natively,
5-7 s on this 2-core machine under load, 12-50 s under TCG (docs/vm.md), all before the
daemon could say anything.  This module imports only the stdlib notifier (~30 ms) and
grants that import IMPORT_EXTEND_S with one EXTEND_TIMEOUT_USEC= (systemd only ever
lengthens the deadline with it); main.run sends the next ones (kmodd.daemon.startup).
"""

from __future__ import annotations

from kmodd.daemon.notify import Notifier
from kmodd.daemon.startup import IMPORT_EXTEND_S


def main() -> int:
    Notifier().extend_timeout(int(IMPORT_EXTEND_S * 1_000_000))
    from kmodd.daemon import main as daemon  # noqa: PLC0415 -- the point of this module

    return daemon.main()


if __name__ == "__main__":
    raise SystemExit(main())
