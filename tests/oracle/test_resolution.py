"""kmodd's resolution and load set against `modprobe -R` / `-D` on the real tree.

Three configurations: none (an empty -C dir), the corpus in tests/data/modprobe.d (five
dirs, kmod precedence), and Debian's shipped /lib/modprobe.d + /etc/modprobe.d copied
into a temporary root.  Counts are printed (pytest -s) and recorded in docs/kmod.md.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from kmodd.kmod.context import KmodContext, config_dirs
from kmodd.kmod.model import Resolution
from tests.kerneltree import KernelTree
from tests.oracle.modprobe import Oracle, render_d, render_r, separator_file
from tests.oracle.names import fuzz_names, modalias_names, request_names

pytestmark = pytest.mark.oracle

CORPUS = Path(__file__).resolve().parents[1] / "data/modprobe.d"
# Names the corpus configuration talks about, in every spelling that matters.
CORPUS_NAMES = [
    "my_net",
    "my-net",
    "my-fs-foo",
    "my_fs_",
    "ab1-x",
    "ab1_x",
    "ab2-y",
    "ab2_y",
    "tty-ldisc-99",
    "net-pf-999",
    "cramfs",
    "ghost-module",
    "ghost_module",
    "net-pf-5",
    "sctp",
    "udf",
    "vfat",
    "ext4",
    "algif-aead",
    "algif_aead",
    "algif-hash",
    "escaped-name",
    "escaped\\-name",
    "swallowed-by-comment",
    "dccp",
    "dccp-alias",
    "local-alias",
    "usr-alias",
    "override-probe",
    "masked-alias",
    "hidden-alias",
    "txt-alias",
    "inner-alias",
    "lib-alias",
    "fat",
    "loop",
    "dummy",
    "crc32c",
    "crc32c-intel",
    "crc32c_generic",
    "n_hdlc",
    "n-hdlc",
    "af_alg",
    "bad]x",
    "bad",
    "appletalk",
    "msdos",
    "nls_utf8",
    "libcrc32c",
    "kmodd-oracle-unknown",
]
ODD_NAMES = ("-", "--", "*", "?", "[", "a[b", "net-pf-*", ".", "..", "ext4.ko", "EXT4", " ")


@dataclass
class Side:
    ctx: KmodContext
    oracle: Oracle


@dataclass
class Tally:
    label: str
    total: int = 0
    agree: int = 0

    def __str__(self) -> str:
        pct = 100.0 * self.agree / self.total if self.total else 100.0
        return f"{self.label}: {self.agree}/{self.total} agree ({pct:.2f}%)"


def _open(tree: KernelTree, config: Sequence[str], tmp: Path) -> Iterator[Side]:
    paths = (*config, str(separator_file(tmp)))
    ctx = KmodContext(tree.root, tree.release, config_paths=paths)
    try:
        yield Side(ctx, Oracle(tree.dirname, tree.release, paths))  # -d: ROOT or ROOT/usr
    finally:
        assert ctx.close(), "a libkmod reference leaked"


@pytest.fixture(scope="module")
def bare(kernel_tree: KernelTree, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Side]:
    tmp = tmp_path_factory.mktemp("bare")
    (tmp / "empty").mkdir()
    yield from _open(kernel_tree, [str(tmp / "empty")], tmp)


@pytest.fixture(scope="module")
def corpus(kernel_tree: KernelTree, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Side]:
    yield from _open(kernel_tree, config_dirs(CORPUS), tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def debian(kernel_tree: KernelTree, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Side]:
    tmp = tmp_path_factory.mktemp("debian")
    root = tmp / "root"
    for rel in ("etc/modprobe.d", "lib/modprobe.d"):
        source = Path("/") / rel
        if source.is_dir():
            shutil.copytree(source, root / rel, symlinks=True)
        else:
            (root / rel).mkdir(parents=True)
    yield from _open(kernel_tree, config_dirs(root), tmp)


def _compare(
    side: Side,
    names: Sequence[str],
    flag: str,
    render: Callable[[Resolution], tuple[str, ...]],
    label: str,
) -> Tally:
    theirs = side.oracle.run(flag, names)
    tally = Tally(f"{label} {flag}")
    diffs = []
    for name in names:
        ours = render(side.ctx.resolve(name))
        tally.total += 1
        if ours == theirs[name]:
            tally.agree += 1
        else:
            diffs.append((name, ours, theirs[name]))
    print(tally)
    assert not diffs, f"{len(diffs)} differences, first: {diffs[:5]}"
    return tally


def _all(side: Side, names: Sequence[str], label: str) -> None:
    _compare(side, names, "-R", render_r, label)
    _compare(side, names, "-D", render_d, label)


def test_every_module_name(bare: Side) -> None:
    names = bare.ctx.module_names()
    assert len(names) > 3000
    _all(bare, names, "module names")


def test_every_request_alias(bare: Side, kernel_tree: KernelTree) -> None:
    names = request_names(kernel_tree.module_dir)
    assert len(names) > 1000
    resolved = sum(bare.ctx.resolve(n).resolved for n in names)
    assert resolved >= 0.99 * len(names), "instantiated names must mostly resolve"
    _all(bare, names, "request aliases")


def test_device_modaliases(bare: Side, kernel_tree: KernelTree) -> None:
    names = modalias_names(kernel_tree.module_dir)
    assert len(names) >= 2000
    resolved = sum(bare.ctx.resolve(n).resolved for n in names)
    assert resolved >= 0.99 * len(names), "instantiated names must mostly resolve"
    _all(bare, names, "device modaliases")


def test_odd_names(bare: Side) -> None:
    _all(bare, ODD_NAMES, "odd names")


def test_fresh_process_per_name(bare: Side, kernel_tree: KernelTree) -> None:
    # The batched oracle shares one libkmod context across names, like the daemon does;
    # a sample with one fresh modprobe per name guards against state carried over.
    names = [*request_names(kernel_tree.module_dir)[::25], *bare.ctx.module_names()[::100]]
    for name in names:
        res = bare.ctx.resolve(name)
        assert render_r(res) == bare.oracle.single("-R", name), name
        assert render_d(res) == bare.oracle.single("-D", name), name
    print(f"fresh process per name: {len(names)}/{len(names)} agree")


def test_corpus_config(corpus: Side, kernel_tree: KernelTree) -> None:
    names = [*CORPUS_NAMES, *corpus.ctx.module_names(), *request_names(kernel_tree.module_dir)]
    names = list(dict.fromkeys(names))
    _all(corpus, names, "corpus modprobe.d")
    # The corpus must be exercised, not just agreed with: spot-check kmod semantics.
    assert corpus.ctx.resolve("my-net").modules == ("dummy", "loop")
    assert corpus.ctx.resolve("my-net").blacklisted == ("loop",)
    assert corpus.ctx.resolve("override-probe").modules == ("dummy",)  # etc/ wins
    assert not corpus.ctx.resolve("masked-alias").resolved  # /dev/null mask
    assert not corpus.ctx.resolve("hidden-alias").resolved  # dotfile
    assert not corpus.ctx.resolve("inner-alias").resolved  # subdirectory


def test_debian_shipped_config(debian: Side, kernel_tree: KernelTree) -> None:
    names = [*debian.ctx.module_names(), *request_names(kernel_tree.module_dir)]
    _all(debian, list(dict.fromkeys(names)), "debian modprobe.d")


def test_fuzzed_names(bare: Side, corpus: Side, kernel_tree: KernelTree) -> None:
    names = fuzz_names(kernel_tree.module_dir, 2000)
    _all(bare, names, "fuzzed names")
    _all(corpus, names, "fuzzed names, corpus modprobe.d")
