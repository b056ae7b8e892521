"""Property: the provenance reader parses any modprobe.d text exactly as libkmod does.

libkmod is the oracle, in-process: for generated files, every alias, blacklist,
install, remove and options line (normalized name and verbatim value, in order) and
every softdep key must equal what kmod_config_get_* report.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmodd.kmod.context import KmodContext
from kmodd.kmod.provenance import Provenance
from tests.kmod.conftest import TinyTree

WORDS = st.sampled_from(
    ["alias", "blacklist", "options", "install", "remove", "softdep", "include", "pre:",
     "post:", "dummy", "my-mod", "a_b", "x[0-9]-y", "b]ad", "op[en", "k=v", "#", "*", "?"]
)  # fmt: skip
SEPS = st.sampled_from([" ", "\t", "  ", " \t", "\\\n", "\\", "\r", ""])
LINE = st.lists(st.tuples(WORDS, SEPS), max_size=6).map(
    lambda parts: "".join(w + s for w, s in parts)
)
LEAD = st.sampled_from(["", "", "", " ", "\t", "#"])
FILE = st.lists(st.tuples(LEAD, LINE), max_size=12).map(
    lambda lines: "".join(lead + line + "\n" for lead, line in lines)
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(text=FILE)
def test_reader_matches_libkmod(tiny_tree: TinyTree, tmp_path: Path, text: str) -> None:
    conf = tmp_path / "fuzz.conf"
    conf.write_text(text)
    prov = Provenance([conf], tiny_tree.module_dir)  # modules.softdep joins the list
    with KmodContext(tiny_tree.root, tiny_tree.release, config_paths=[conf]) as ctx:
        got = {d: [(ln.target, ln.value) for ln in prov.of(d)] for d in ("alias", "install")}
        assert got["alias"] == list(ctx.config_aliases())
        assert got["install"] == list(ctx.config_installs())
        assert [(ln.target, ln.value) for ln in prov.of("remove")] == list(ctx.config_removes())
        options = [(ln.target, ln.value) for ln in prov.of("options")]
        assert options == list(ctx.config_options())[: len(options)]  # then /proc/cmdline
        blacklist = [ln.target for ln in prov.of("blacklist")]
        assert blacklist == list(ctx.config_blacklists())[: len(blacklist)]
        softdeps = [k for k, _ in ctx.config_softdeps()]
        assert [ln.target for ln in prov.of("softdep")] == softdeps
