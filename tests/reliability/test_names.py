"""Hostile request names: through the daemon's decide socket (most cases: cheap), through
libkmod's resolution in-process (no path outside the module tree), and through the real
helper process run as the kernel runs it (a few hundred: ~0.1 s each).

Every name gets a verdict, within the client timeout, and the daemon's answer agrees with
its own Explain; the helper only ever execs modprobe with exactly a valid name, runs no
shell, and writes nothing.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kmodd import helper
from kmodd.kmod.context import KmodContext
from kmodd.kmod.model import StepKind
from tests.conftest import root_required
from tests.kerneltree import KernelTree
from tests.reliability.conftest import Rel, Tally, decide_raw, fuzz, run_kernel_helper

pytestmark = [pytest.mark.reliability, root_required, pytest.mark.root]

BATCH = 50  # names per example: one hypothesis example costs more than a round trip

PIECES = [
    "/", "..", "../", "../../../../etc/passwd", ".", "~", "$(", ")", "`", ";", "|", "&", "&&",
    ">", "<", "'", '"', "\\", "*", "?", "[", "]", "[!a-z]", "{a,b}", "$IFS", "${IFS}", "%s",
    "%n", "-", "--", "-q", "--deny", "\x00", "\n", "\r", "\t", " ", "\x7f", "\x1b[2J", "é",
    "\u202e", "\ufeff", "net-pf-", "fs-", "crypto-", "algif-", "char-major-", "tty-ldisc-",
    "algif-aead", "vfat", "fs-vfat", "fs-cramfs", "sch_", "nft-", "rtnl-link-", "pci:v*",
    "usb:v1234p*", "0", "38", "$(touch${IFS}pwned)", ";touch pwned", "`touch pwned`",
]  # fmt: skip
piece_names = st.lists(st.sampled_from(PIECES), min_size=0, max_size=8).map("".join)
names_text = st.one_of(
    piece_names,
    st.text(max_size=70),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=60),
    st.text(min_size=54, max_size=300),
)
names_bytes = st.one_of(
    names_text.map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=80),
    st.binary(min_size=56, max_size=700),
)
REPLY = re.compile(rb"(?:allow|deny) [!-~]+\n|error [ -~]*\n")


def _decide_expectation(rel: Rel, name: bytes, cache: dict[bytes, bytes]) -> bytes | None:
    """What decide.sock must answer for `decide NAME\\n` (None: an `error` line is due).
    The daemon reads up to the first newline, so that prefix is the name it decides."""
    line = name.split(b"\n", 1)[0]
    if len(helper.DECIDE_PREFIX) + len(name) + 1 > helper.DECIDE_MAX and b"\n" not in name:
        return None  # "error request too long" -- or deny invalid-name; both are verdicts
    if not helper.valid_name(line):
        return b"deny invalid-name\n"
    if line not in cache:
        cache[line] = rel.expect(line.decode("ascii"))
    return cache[line]


@fuzz(170)
@given(st.lists(names_bytes, min_size=BATCH, max_size=BATCH))
def test_decide_socket_answers_every_name(rel: Rel, tally: Tally, names: list[bytes]) -> None:
    """~8,500 names straight to decide.sock (what a root helper could send)."""
    cache: dict[bytes, bytes] = {}
    for name in names:
        reply = decide_raw(rel, name)
        assert REPLY.fullmatch(reply), (name, reply)
        expected = _decide_expectation(rel, name, cache)
        if expected is None:
            assert reply in (b"error request too long\n", b"deny invalid-name\n"), (name, reply)
        else:
            assert reply == expected, (name, reply, expected)
    assert rel.alive()
    invalid = sum(not helper.valid_name(n.split(b"\n", 1)[0]) for n in names)
    tally.add("names.decide_socket", len(names), invalid=invalid, wrong=0, crashes=0)


@pytest.fixture(scope="module")
def kmod(kernel_tree: KernelTree) -> KmodContext:
    return KmodContext(kernel_tree.root, kernel_tree.release)


# Names that do resolve (so there are paths to check), alone and inside hostile text.
REAL = [
    "vfat", "fs-vfat", "ext4", "fs-ext4", "algif-aead", "net-pf-38", "crypto-aes", "dummy",
    "loop", "msdos", "net-pf-5", "sctp", "dccp", "tty-ldisc-2", "char-major-10-237",
]  # fmt: skip
resolvable = st.one_of(
    st.sampled_from(REAL),
    st.tuples(piece_names, st.sampled_from(REAL), piece_names).map("".join),
    names_text,
)


@fuzz(60)
@given(st.lists(resolvable, min_size=BATCH, max_size=BATCH))
def test_resolution_never_leaves_the_module_tree(
    kmod: KmodContext, kernel_tree: KernelTree, tally: Tally, names: list[str]
) -> None:
    """Whatever the name, every file libkmod would insmod lies inside lib/modules/REL."""
    top = kernel_tree.module_dir.resolve()
    steps = 0
    for name in names:
        if "\0" in name:
            continue  # libkmod takes C strings; the daemon refuses NUL before (valid_name)
        for step in kmod.resolve(name).steps:
            steps += 1
            if step.kind is StepKind.INSMOD:
                assert step.path is not None
                assert Path(step.path).resolve().is_relative_to(top), (name, step.path)
    tally.add("names.resolution", len(names), insmod_steps=steps, outside_tree=0)


HELPER_NAMES = st.one_of(
    piece_names.filter(lambda s: "\0" not in s),
    st.text(alphabet=st.characters(blacklist_characters="\0"), max_size=70),
    st.sampled_from(["algif-aead", "fs-vfat", "fs-cramfs", "net-pf-38", "", "a" * 56]),
)


@fuzz(30)
@given(st.lists(HELPER_NAMES, min_size=10, max_size=10))
def test_real_helper_process(rel: Rel, tally: Tally, tmp_path_factory: pytest.TempPathFactory,
                             names: list[str]) -> None:  # fmt: skip
    """The helper as the kernel runs it: exit 1 and no exec for invalid or denied names,
    exec of modprobe with exactly `-q -- NAME` for allowed ones; no shell ever runs (the
    working directory stays empty although names say `touch pwned`)."""
    cwd = tmp_path_factory.mktemp("helper-cwd")
    expected: dict[str, tuple[int, list[str] | None]] = {}
    for name in names:
        raw = name.encode("utf-8", "surrogateescape")
        if not helper.valid_name(raw):
            expected[name] = (1, None)
        else:
            verdict = rel.expect(name).split(b" ")[0]
            expected[name] = (0, ["-q", "--", name]) if verdict == b"allow" else (1, None)
    with ThreadPoolExecutor(4) as pool:
        got = list(
            pool.map(lambda n: run_kernel_helper(rel.records, rel.sr.runtime, n, cwd), names)
        )
    for name, result in zip(names, got, strict=True):
        assert result == expected[name], (name, result)
    assert list(cwd.iterdir()) == []
    tally.add("names.helper_process", len(names), wrong=0, shells=0)
