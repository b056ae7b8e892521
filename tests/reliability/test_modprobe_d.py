"""modprobe.d garbage in every directory kmod reads (binary, NUL, huge lines, dangling
continuations, unbalanced brackets, half directives): nothing in kmodd crashes (libkmod
binding, provenance reader, a whole generation build and publish), and kmodd's answers
agree with what kmod's own modprobe (-R/-D -C DIR -d ROOT -S REL) makes of the same files.

Runs on tests/kmod's tiny tree (17 real modules, depmod'ed): config parsing is what is under
test, and a generation over the tiny tree builds in milliseconds."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kmodd.daemon.generation import BuildOptions, build_generation, publish
from kmodd.kmod.context import KmodContext, config_dirs
from kmodd.kmod.provenance import Provenance
from kmodd.paths import MODPROBE_D_DIRS, Paths
from kmodd.policy.types import Source
from tests.kmod.conftest import TinyTree, tiny_tree  # noqa: F401 -- the fixture, reused
from tests.oracle.modprobe import Oracle, render_d, render_r, separator_file
from tests.reliability.conftest import POLICY, Tally, fuzz

pytestmark = pytest.mark.reliability

NAMES = [
    "vfat", "fs-vfat", "msdos", "fat", "ext4", "fs-ext4", "algif-aead", "algif_hash",
    "crypto-crc32c", "crc32c", "dummy", "loop", "appletalk", "net-pf-5", "llc", "psnap",
    "kmodd-garbage-alias", "kmodd-glob-1", "kmodd-nothing", "x[0-9]y", "a]b", "*",
]  # fmt: skip
GOOD_LINES = [
    "alias kmodd-garbage-alias vfat", "alias kmodd-glob-* msdos", "blacklist loop",
    "install dummy /bin/true", "remove dummy /bin/false", "options vfat utf8=1",
    "softdep ext4 pre: crc16 post: loop", "alias fs-vfat msdos", "options fat\tcodepage=437",
]  # fmt: skip
BAD_LINES = [
    "alias x[0-9 vfat", "alias x]y vfat", "alias [ ]", "install", "options", "alias only-one",
    "softdep", "softdep ext4 pre:", "blacklist", "include /etc/passwd", "alias a b c d",
    "install vfat[ /bin/true", "\t# indented comment", "  alias leading-space vfat",
    "alias kmodd-cont \\", "options vfat \\", "\\", "alias \x00 vfat", "alias é vfat",
]  # fmt: skip
binary = st.binary(max_size=300)
text_line = st.sampled_from(GOOD_LINES + BAD_LINES) | st.text(max_size=60).map(
    lambda s: s.replace("\n", " ").replace("\r", " ")  # the oracle reads text: \r is a newline
)
garbage_file = st.one_of(
    st.lists(text_line, max_size=12).map(lambda lines: "\n".join(lines).encode("utf-8", "replace")),
    st.lists(text_line, min_size=1, max_size=6).map(
        lambda lines: ("\\\n".join(lines) + "\\").encode("utf-8", "replace")  # dangling
    ),
    binary,
    st.builds(
        lambda n: b"options vfat " + b"x" * n + b"\nalias kmodd-after-huge vfat\n",
        st.sampled_from([1000, 70_000, 300_000]),
    ),
    st.just(b"\x00" * 64 + b"\nalias kmodd-after-nul vfat\n"),
)
directory_files = st.dictionaries(
    st.sampled_from(["00-a.conf", "50-garbage.conf", "99-z.conf", "x.alias", ".hidden.conf"]),
    garbage_file,
    max_size=3,
)
trees = st.tuples(*[directory_files for _ in MODPROBE_D_DIRS])


@pytest.fixture(scope="module")
def garbage_root(tiny_tree: TinyTree, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:  # noqa: F811
    root = tmp_path_factory.mktemp("garbage") / "root"
    (root / "lib/modules").mkdir(parents=True)
    (root / "lib/modules" / tiny_tree.release).symlink_to(tiny_tree.module_dir)
    yield root
    shutil.rmtree(root.parent, ignore_errors=True)


def _populate(root: Path, files: tuple[dict[str, bytes], ...]) -> None:
    for rel, content in zip(MODPROBE_D_DIRS, files, strict=True):
        directory = root / rel
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        for name, data in content.items():
            (directory / name).write_bytes(data)


@fuzz(150)
@given(trees)
def test_garbage_in_every_modprobe_d_dir(
    garbage_root: Path,
    tiny_tree: TinyTree,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
    tally: Tally,
    files: tuple[dict[str, bytes], ...],
) -> None:
    root, release = garbage_root, tiny_tree.release
    _populate(root, files)
    config = config_dirs(root)
    scratch = tmp_path_factory.mktemp("oracle")
    oracle = Oracle(root, release, (*config, str(separator_file(scratch))))
    with KmodContext(root, release, config_paths=oracle.config) as ctx:
        ours = {name: ctx.resolve(name) for name in NAMES}
        theirs_r, theirs_d = oracle.run("-R", NAMES), oracle.run("-D", NAMES)
        for name in NAMES:
            assert render_r(ours[name]) == theirs_r[name], (name, files)
            assert render_d(ours[name]) == theirs_d[name], (name, files)
        # The provenance reader (explain's file:line) parses the files as libkmod does
        # (the oracle's separator file sorts last and adds one install line).
        prov = Provenance(config, tiny_tree.module_dir)
        assert [(ln.target, ln.value) for ln in prov.of("alias")] == list(ctx.config_aliases())
        installs = [(ln.target, ln.value) for ln in prov.of("install")]
        assert installs == list(ctx.config_installs())[: len(installs)]
    # A whole generation over this root builds and publishes: no crash anywhere.
    (root / "etc/kmodd/policy.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/kmodd/policy.d/10-test.yaml").write_text(POLICY)
    paths = Paths(root, release, scratch / "runtime")
    paths.runtime_dir.mkdir()
    gen = publish(build_generation(1, paths, BuildOptions(cmdline=scratch / "none")))
    try:
        assert gen.decide("algif-aead", Source.KERNEL).rule == "copy-fail"
    finally:
        gen.close()
    tally.add(
        "modprobe_d.garbage",
        1,
        files=sum(len(f) for f in files),
        names_compared=2 * len(NAMES),
        disagreements=0,
    )
