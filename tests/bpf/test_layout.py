"""The map and event layout: Python's ctypes structures against the C program's own
_Static_assert sizes, and the encoding of what the daemon puts in."""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

import pytest

from kmodd.bpf import layout
from kmodd.bpf.layout import Cond, Condition, KernelEvent, LayoutError, NameRules, Verdict

SOURCE = Path(layout.__file__).with_name("kmodd.bpf.c")
STRUCTS = {
    "config": layout.ConfigC,
    "name_key": layout.NameKeyC,
    "cond": layout.CondC,
    "name_entry": layout.NameEntryC,
    "file_key": layout.FileKeyC,
    "file_entry": layout.FileEntryC,
    "event": layout.EventC,
}


def c_sizes() -> dict[str, int]:
    pattern = re.compile(r"_Static_assert\(sizeof\(struct (\w+)\) == (\d+)")
    return {m[1]: int(m[2]) for m in pattern.finditer(SOURCE.read_text())}


def test_every_shared_struct_has_the_size_the_c_program_asserts() -> None:
    sizes = c_sizes()
    assert set(sizes) == set(STRUCTS)
    assert {name: ctypes.sizeof(s) for name, s in STRUCTS.items()} == sizes


def test_the_c_constants_match() -> None:
    text = SOURCE.read_text()
    for name, value in (("NAME_LEN", layout.NAME_LEN), ("CONDS_MAX", layout.CONDS_MAX)):
        assert re.search(rf"#define {name} {value}\b", text), name
    assert "0xEFFFFFFDU" in text and layout.USER_NS_INIT_INO == 0xEFFFFFFD


def test_a_condition_encodes_its_flags_and_ranges() -> None:
    c = Condition(Verdict.DENY, 7, uid=(1000, 1999), unprivileged=True, userns=False).encode()
    assert Cond(c.flags) == Cond.UID | Cond.UNPRIVILEGED | Cond.INIT_USERNS
    assert (c.verdict, c.rule, c.uid_lo, c.uid_hi) == (2, 7, 1000, 1999)
    assert Cond(Condition(Verdict.ALLOW, 1, unprivileged=False).encode().flags) == Cond.PRIVILEGED


@pytest.mark.parametrize("bad", [(5, 4), (-1, 3), (0, 0xFFFFFFFF)])
def test_a_bad_range_is_refused(bad: tuple[int, int]) -> None:
    with pytest.raises(LayoutError, match="range"):
        Condition(Verdict.DENY, 1, gid=bad).encode()


def test_more_conditions_than_the_program_evaluates_are_refused() -> None:
    conds = tuple(Condition(Verdict.DENY, i, uid=(i, i)) for i in range(layout.CONDS_MAX + 1))
    with pytest.raises(LayoutError, match="at most 8"):
        NameRules(conds).encode()


def test_name_rules_keep_their_order() -> None:
    rules = NameRules(
        (Condition(Verdict.ALLOW, 1, uid=(0, 0)), Condition(Verdict.DENY, 2, userns=True)),
        Verdict.PASS,
    )
    entry = rules.encode()
    assert entry.nconds == 2
    assert [entry.conds[i].rule for i in range(2)] == [1, 2]
    assert entry.fallback_rule == layout.NO_RULE


def test_request_names_are_zero_padded_keys_and_long_ones_refused() -> None:
    key = layout.encode_name("net-pf-5")
    assert key == b"net_pf_5".ljust(layout.NAME_LEN, b"\0") == layout.encode_name("net_pf_5")
    assert layout.encode_name("") == bytes(layout.NAME_LEN)  # the every-other-name entry
    with pytest.raises(LayoutError):
        layout.encode_name("x" * layout.NAME_LEN)
    with pytest.raises(LayoutError):
        layout.encode_name("a\0b")
    with pytest.raises(LayoutError, match="never looked up"):
        layout.encode_name("pci:v[0-9]")


def test_kernel_dev_is_the_kernels_internal_encoding() -> None:
    # stat's st_dev for 259:65537 (new_encode_dev) -> MKDEV = 259 << 20 | 65537
    st_dev = os.makedev(259, 65537)
    assert layout.kernel_dev(st_dev) == (259 << 20) | 65537


def test_an_event_decodes_with_unset_audit_ids_as_none() -> None:
    raw = layout.EventC(
        kind=1,
        action=2,
        verdict=2,
        rule=4,
        generation=3,
        pid=10,
        tgid=9,
        uid=65534,
        euid=65534,
        gid=65534,
        loginuid=layout.AUDIT_UNSET,
        sessionid=layout.AUDIT_UNSET,
        userns_inum=layout.USER_NS_INIT_INO,
        mode=0,
        comm=b"x\n",
        name=b"net-pf-5",
    )
    ev = KernelEvent.decode(bytes(raw))
    assert (ev.kind, ev.action, ev.rule, ev.name, ev.comm) == (
        layout.Kind.REQUEST,
        layout.Action.DENIED,
        4,
        "net-pf-5",
        "x\n",
    )
    assert ev.loginuid is None and ev.sessionid is None and ev.in_init_userns
    with pytest.raises(LayoutError):
        KernelEvent.decode(bytes(raw)[:100])
