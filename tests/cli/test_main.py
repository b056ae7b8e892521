"""kmodctl's parser, verb table and error wrapper."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kmodd.cli import main as cli
from kmodd.cli.verbs import Verb, VerbSpec
from kmodd.errors import KmoddError

KMODCTL = Path(sys.executable).with_name("kmodctl")


def test_every_verb_has_a_parser_entry() -> None:
    table = cli.verb_table()
    assert list(table) == list(Verb)
    assert all(isinstance(spec, VerbSpec) and spec.help for spec in table.values())


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for needle in ("examples:", "kmodctl explain net-pf-5", "exit codes", "policy.d", "--root"):
        assert needle in out
    for verb in Verb:
        assert verb in out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["explain"],
        ["--root"],
        ["explain", "-x", "a"],
        ["explain", "a", "--source", "user"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_json_is_accepted_before_and_after_the_verb() -> None:
    parser = cli.make_parser()
    assert parser.parse_args(["--json", "schema"]).json is True
    assert parser.parse_args(["schema", "--json"]).json is True
    assert parser.parse_args(["schema"]).json is False


def boom_kmodd(args: object) -> int:
    raise KmoddError("it broke", hint="do the other thing")


def boom_bug(args: object) -> int:
    raise ZeroDivisionError("division by zero")


@pytest.fixture
def broken_verb(monkeypatch: pytest.MonkeyPatch) -> None:
    real = cli.verb_table

    def table(*, plugins: bool = True) -> dict[Verb, VerbSpec]:
        verbs = real(plugins=plugins)
        verbs[Verb.SCHEMA] = VerbSpec(Verb.SCHEMA, "x", f"{__name__}:boom_kmodd")
        verbs[Verb.VALIDATE] = VerbSpec(Verb.VALIDATE, "x", f"{__name__}:boom_bug")
        return verbs

    monkeypatch.setattr(cli, "verb_table", table)


@pytest.mark.usefixtures("broken_verb")
def test_kmodd_errors_print_message_and_hint(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["schema"]) == 1
    assert capsys.readouterr().err == "kmodctl: it broke\n  hint: do the other thing\n"


@pytest.mark.usefixtures("broken_verb")
def test_bugs_are_reported_without_traceback_unless_debug(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["validate"]) == 1
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError" in err
    assert "Traceback" not in err
    with pytest.raises(ZeroDivisionError):
        cli.main(["--debug", "validate"])


def test_installed_entry_point_help_is_cheap() -> None:
    """`kmodctl --help` must not import pydantic, yaml or libkmod (~100 ms)."""
    code = (
        "import sys; from kmodd.cli import main as m\n"
        "try:\n    m.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "bad = [n for n in ('pydantic', 'yaml', 'kmodd.kmod.libkmod', 'kmodd.policy.model')"
        " if n in sys.modules]\n"
        "print('HEAVY', bad, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in proc.stderr


def test_kmodctl_script_runs() -> None:
    proc = subprocess.run([str(KMODCTL), "--version"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0
    assert proc.stdout.startswith("kmodctl ")


@pytest.mark.parametrize(
    ("argv", "offline"),
    [
        (["explain", "x"], True),
        (["--root", "status", "validate"], True),  # "status" is the value of --root
        (["--root=/x", "--json", "schema"], True),
        (["status"], False),
        (["--kernel", "explain", "status"], False),
        (["--help"], False),
        ([], False),
    ],
)
def test_offline_verbs_skip_the_plugin_modules(argv: list[str], offline: bool) -> None:
    assert cli._runs_offline_verb(argv) is offline


def test_offline_verb_does_not_import_the_daemon_client() -> None:
    code = (
        "import sys; from kmodd.cli import main as m\n"
        "m.main(['schema'])\n"
        "print('LOADED', [n for n in ('kmodd.cli.online', 'kmodd.cli.client') if n in sys.modules],"
        " file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "LOADED []" in proc.stderr
