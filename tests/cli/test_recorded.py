"""Reading decisions back through journalctl: a journalctl that writes much more to stderr
than a pipe holds while it streams records must neither hang kmodctl nor lose records."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kmodd.cli.recorded import JournalQuery, JournalReadError, read_decisions
from kmodd.policy.types import Outcome, Source

RECORD = {
    "MESSAGE_ID": "3fd47b15f71a497a96fce61bb48c2e03",
    "KMODD_REQUEST": "algif-aead",
    "KMODD_VERDICT": "deny",
    "KMODD_RULE": "copy-fail",
    "KMODD_MODULES": "af_alg algif_aead",
    "KMODD_SOURCE": "kernel",
    "KMODD_MODE": "enforce",
}
# 1 MiB of warnings first (16 pipe buffers), then the records, then more warnings.
FAKE = f"""#!{sys.executable}
import sys
warn = b"journalctl: file corrupted, ignoring\\n" * 30000
sys.stderr.buffer.write(warn)
sys.stderr.flush()
for _ in range(3):
    print({json.dumps(json.dumps(RECORD))})
sys.stdout.flush()
sys.stderr.buffer.write(warn)
sys.exit(int(sys.argv[-1] == "fail"))
"""


@pytest.fixture
def fake_journalctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    exe = tmp_path / "journalctl"
    exe.write_text(FAKE)
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    return exe


def test_a_chatty_stderr_never_blocks_the_records(fake_journalctl: Path) -> None:
    found = list(read_decisions(JournalQuery()))
    assert [(r.request, r.source, r.outcome) for r in found] == [
        ("algif-aead", Source.KERNEL, Outcome.DENY)
    ] * 3


def test_a_failure_reports_the_start_of_stderr(
    fake_journalctl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = fake_journalctl.read_text().replace('sys.argv[-1] == "fail"', "True")
    fake_journalctl.write_text(text)
    with pytest.raises(JournalReadError, match="file corrupted"):
        list(read_decisions(JournalQuery()))
