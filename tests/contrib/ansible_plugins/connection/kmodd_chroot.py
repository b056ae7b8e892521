"""An Ansible connection to a chroot directory, for tests/contrib/test_ansible.py.

ansible-core has no chroot connection: `community.general.chroot` is in the
community.general collection, which comes with the 40+ MB `ansible` package from PyPI or
from Ansible Galaxy (not reached from CI).  This plugin does the same the lean way: every
command runs as `chroot DIR /bin/sh -c CMD` (the command line Ansible builds for a remote
shell, as community.general.chroot runs it), files travel through `cat` inside the chroot.
The host is the chroot directory (ansible_host).
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Any

from ansible.errors import AnsibleError
from ansible.plugins.connection import ConnectionBase

DOCUMENTATION = """
name: kmodd_chroot
short_description: run tasks inside a chroot directory (kmodd's tests)
description:
  - Runs every command with chroot(8) in the directory given as the host.
author: kmodd
options:
  remote_addr:
    description: the chroot directory
    default: inventory_hostname
    vars:
      - name: inventory_hostname
      - name: ansible_host
"""

COMMAND_TIMEOUT_S = 900  # one task: a pip install into a venv is the slowest, ~30 s


class Connection(ConnectionBase):  # type: ignore[misc]
    transport = "kmodd_chroot"
    has_pipelining = True
    default_user = "root"

    def _root(self) -> str:
        return str(self.get_option("remote_addr"))

    def _connect(self) -> Connection:
        self._connected = True
        return self

    def _chroot(self, cmd: str, stdin: bytes | None) -> tuple[int, bytes, bytes]:
        argv = ["chroot", self._root(), "/bin/sh", "-c", cmd]
        proc = subprocess.run(
            argv, check=False, input=stdin, capture_output=True, timeout=COMMAND_TIMEOUT_S
        )
        return proc.returncode, proc.stdout, proc.stderr

    def exec_command(
        self, cmd: str, in_data: bytes | None = None, sudoable: bool = False
    ) -> tuple[int, bytes, bytes]:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        return self._chroot(cmd, in_data)

    def put_file(self, in_path: str, out_path: str) -> None:
        super().put_file(in_path, out_path)
        data = Path(in_path).read_bytes()
        rc, _, err = self._chroot(f"cat > {shlex.quote(out_path)}", data)
        if rc != 0:
            raise AnsibleError(f"put_file {out_path}: {err.decode(errors='replace')}")

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        rc, out, err = self._chroot(f"cat {shlex.quote(in_path)}", None)
        if rc != 0:
            raise AnsibleError(f"fetch_file {in_path}: {err.decode(errors='replace')}")
        Path(out_path).write_bytes(out)

    def close(self, *_: Any) -> None:
        self._connected = False
