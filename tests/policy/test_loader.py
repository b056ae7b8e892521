"""Loading policy files: every problem located, drop-in dirs, hostile YAML."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kmodd.errors import InvalidInputError
from kmodd.paths import Paths
from kmodd.policy.loader import (
    MAX_FILE_BYTES,
    check_lost_dirs,
    dirs_in_use,
    load_policy,
    load_policy_files,
)
from kmodd.policy.types import Action, Mode

GOOD = """\
kmodd: 1
mode: permissive
default: deny
rules:
  - id: a
    action: allow
    match: {module: [ext4]}
"""


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def problems(*files: Path) -> list[str]:
    with pytest.raises(InvalidInputError) as info:
        load_policy_files(list(files))
    return [str(issue) for issue in info.value.issues]


def test_good_file(tmp_path: Path) -> None:
    policy = load_policy_files([write(tmp_path / "a.yaml", GOOD)])
    assert policy.mode is Mode.PERMISSIVE
    assert policy.default is Action.DENY
    (rule,) = policy.rules
    assert (rule.rule.id, rule.path, rule.line) == ("a", str(tmp_path / "a.yaml"), 5)
    assert len(policy.hash) == 64


def test_all_errors_at_once_with_file_line_col(tmp_path: Path) -> None:
    bad = write(
        tmp_path / "bad.yaml",
        "kmodd: 1\nrules:\n  - id: x\n    action: nope\n    match:\n      modul: [a]\n"
        "  - id: x\n    action: deny\n    match: {module: [a]}\n",
    )
    syntax = write(tmp_path / "syntax.yaml", "kmodd: 1\nrules: [\n")
    found = problems(bad, syntax)
    assert found[0].startswith(f"{bad}:4:13: rules[0].action: Input should be 'allow' or 'deny'")
    assert any(f.startswith(f"{bad}:6:7: rules[0].match.modul: unknown key 'modul'") for f in found)
    assert any(f.startswith(f"{bad}:7:9: rules[1].id: duplicate rule id 'x'") for f in found)
    assert found[-1].startswith(f"{syntax}:3:1: YAML syntax")
    assert len(found) == 4


def test_missing_key_points_at_parent(tmp_path: Path) -> None:
    path = write(tmp_path / "m.yaml", "kmodd: 1\nrules:\n  - id: x\n    match: {module: [a]}\n")
    (found,) = problems(path)
    assert found.startswith(f"{path}:3:5: rules[0].action: missing required key 'action'")


@pytest.mark.parametrize("word", ["no", "off", "yes", "on", "n", "y"])
def test_yaml11_booleans_stay_strings(tmp_path: Path, word: str) -> None:
    text = f"kmodd: 1\nrules:\n  - id: x\n    action: deny\n    match: {{module: [{word}]}}\n"
    policy = load_policy_files([write(tmp_path / "b.yaml", text)])
    assert policy.rules[0].rule.match.module == [word]


def test_true_is_still_a_boolean_and_rejected(tmp_path: Path) -> None:
    text = "kmodd: 1\nrules:\n  - id: x\n    action: deny\n    match: {module: [true]}\n"
    (found,) = problems(write(tmp_path / "t.yaml", text))
    assert ":5:22: rules[0].match.module[0]: Input should be a valid string" in found


def test_duplicate_keys(tmp_path: Path) -> None:
    (found,) = problems(write(tmp_path / "d.yaml", "kmodd: 1\nmode: enforce\nmode: permissive\n"))
    assert found.endswith(
        "d.yaml:3:1: duplicate key 'mode' (hint: first at line 2 column 1; remove one of them)"
    )


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 20):
        prev = chr(ord("a") + i - 1)
        cur = chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [{','.join(['*' + prev] * 9)}]")
    path = write(tmp_path / "bomb.yaml", "\n".join(lines) + "\n")
    start = time.process_time()
    (found,) = problems(path)
    assert "aliases" in found
    assert time.process_time() - start < 5  # 9**20 nodes if expanded: never finishes


def test_oversized_file(tmp_path: Path) -> None:
    path = write(tmp_path / "big.yaml", b"#" * (MAX_FILE_BYTES + 1))
    (found,) = problems(path)
    assert "larger than" in found


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "this one is empty"),
        (b"# only a comment\n", "this one is empty"),
        (b"- a\n", "this one is a list"),
        (b"kmodd: 1\n---\nkmodd: 1\n", "YAML syntax"),
        (b"\xff\xfe", "not valid UTF-8"),
        (b"kmodd: 1\0", "NUL"),
        (b"kmodd: !!python/object/apply:os.system [true]\n", "unsupported YAML tag"),
        (b"kmodd: !!python/name:os.system\n", "constructor"),
        (b"kmodd: !!set {a}\n", "unsupported YAML tag"),
        (b"? [a]\n: b\n", "plain scalars"),
        (b"kmodd: 1\n<<: {mode: enforce}\n", "merge keys"),
        (b"[" * 5000, "YAML syntax"),
        (b"a:\n" + b"".join(b" " * i + b"- \n" for i in range(1, 60)), "nesting"),
    ],
)
def test_hostile_files(tmp_path: Path, data: bytes, needle: str) -> None:
    found = problems(write(tmp_path / "h.yaml", data))
    assert any(needle in f for f in found), found


def test_fifo_is_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "f.yaml"
    os.mkfifo(fifo)
    (found,) = problems(fifo)
    assert "not a regular file" in found


def paths_for(root: Path) -> Paths:
    return Paths(root=root, release="x", runtime_dir=root / "run/kmodd")


def test_drop_in_dirs_override_mask_and_order(tmp_path: Path) -> None:
    usr, etc, run = (
        tmp_path / d for d in ("usr/lib/kmodd/policy.d", "etc/kmodd/policy.d", "run/kmodd/policy.d")
    )
    rule = "kmodd: 1\nrules:\n  - id: {id}\n    action: deny\n    match: {{module: [m]}}\n"
    write(usr / "10-base.yaml", rule.format(id="base-usr"))
    write(etc / "10-base.yaml", rule.format(id="base-etc"))  # replaces the /usr one
    write(usr / "20-masked.yaml", rule.format(id="masked"))
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "20-masked.yaml").symlink_to("/dev/null")
    write(run / "05-first.yaml", rule.format(id="first"))
    write(usr / "30-note.txt", "not yaml")
    write(usr / ".40-hidden.yaml", "broken: [")
    policy = load_policy(paths_for(tmp_path))
    assert [r.rule.id for r in policy.rules] == ["first", "base-etc"]
    assert policy.masked == (str(etc / "20-masked.yaml"),)
    assert [Path(f.path).name for f in policy.files] == ["05-first.yaml", "10-base.yaml"]


def test_no_policy_dirs_is_an_empty_policy(tmp_path: Path) -> None:
    policy = load_policy(paths_for(tmp_path))
    assert policy.rules == ()
    assert (policy.mode, policy.default) == (Mode.ENFORCE, Action.ALLOW)


def test_last_file_setting_mode_and_default_wins(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "kmodd: 1\nmode: permissive\ndefault: deny\n")
    b = write(tmp_path / "b.yaml", "kmodd: 1\nmode: enforce\n")
    policy = load_policy_files([a, b])
    assert (policy.mode, policy.mode_from) == (Mode.ENFORCE, str(b))
    assert (policy.default, policy.default_from) == (Action.DENY, str(a))


def test_hash_changes_with_content_and_name(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "kmodd: 1\n")
    h1 = load_policy_files([a]).hash
    write(a, "kmodd: 1\nmode: enforce\n")
    h2 = load_policy_files([a]).hash
    b = write(tmp_path / "b.yaml", a.read_text())
    assert len({h1, h2, load_policy_files([b]).hash}) == 3
    assert load_policy_files([a]).hash == h2


def test_world_writable_policy_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "w.yaml", GOOD)
    path.chmod(0o666)
    (found,) = problems(path)
    assert "writable by every user" in found
    assert "chmod go-w" in found


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_policy_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "o.yaml", GOOD)
    os.chown(path, 65534, 65534)
    (found,) = problems(path)
    assert "owned by uid 65534, not root" in found


def test_positions_count_only_newlines(tmp_path: Path) -> None:
    """libyaml breaks lines at U+2028 and CR too; we report what grep -n shows."""
    text = "kmodd: 1 # caf\u00e9\u2028\r\nmode: sometimes\n"
    (found,) = problems(write(tmp_path / "u.yaml", text.encode()))
    assert ":2:7: mode: Input should be" in found


def test_bad_utf8_is_located(tmp_path: Path) -> None:
    (found,) = problems(write(tmp_path / "b.yaml", b"kmodd: 1\nmode: \xff\n"))
    assert ":2:7: not valid UTF-8 (byte 0xff)" in found


def test_policy_dir_under_a_writable_parent_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "etc/kmodd/policy.d/10-a.yaml", GOOD)
    parent = tmp_path / "etc/kmodd"
    parent.chmod(0o777)  # anyone may rename policy.d away and put their own there
    with pytest.raises(InvalidInputError) as info:
        load_policy(paths_for(tmp_path))
    (found,) = map(str, info.value.issues)
    assert found.startswith(f"{parent}/policy.d: policy dir is unsafe: its parent {parent}")
    assert "writable by every user, who could move it away" in found
    assert f"chown root:root {parent} && chmod go-w {parent}" in found
    parent.chmod(0o1777)  # sticky (like /tmp): only the owner of policy.d may rename it
    assert [r.rule.id for r in load_policy(paths_for(tmp_path)).rules] == ["a"]


def test_lost_policy_dir_is_refused_unless_accepted(tmp_path: Path) -> None:
    write(tmp_path / "usr/lib/kmodd/policy.d/10-a.yaml", GOOD)
    write(tmp_path / "etc/kmodd/policy.d/20-b.yaml", "kmodd: 1\n")
    paths = paths_for(tmp_path)
    had = dirs_in_use(paths)
    assert had == ("usr/lib/kmodd/policy.d", "etc/kmodd/policy.d")
    (tmp_path / "etc/kmodd/policy.d/20-b.yaml").unlink()  # emptied, still there: an edit
    check_lost_dirs(paths, had, ())
    (tmp_path / "etc/kmodd/policy.d").rmdir()
    with pytest.raises(InvalidInputError) as info:
        check_lost_dirs(paths, had, ())
    (found,) = map(str, info.value.issues)
    assert found.startswith(f"{tmp_path}/etc/kmodd/policy.d: policy dir is gone")
    assert "kmodctl reload --accept-removed /etc/kmodd/policy.d" in found
    check_lost_dirs(paths, had, {"etc/kmodd/policy.d"})
    # The runtime dir is volatile by design (a reboot empties /run): never a lost dir.
    check_lost_dirs(paths, ("run/kmodd/policy.d",), ())
