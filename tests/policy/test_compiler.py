"""The compiler on the real Debian tree: modprobe.d text checked with kmod's modprobe,
the helper snapshot checked with the helper's own reader."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodd import helper
from kmodd.kmod.context import KmodContext
from kmodd.policy.compiler import (
    exact_request_aliases,
    module_verdict,
    render_enforcement,
    render_snapshot,
)
from kmodd.policy.engine import CompiledPolicy, Request, compile_policy, decide
from kmodd.policy.loader import load_policy_files
from kmodd.policy.types import Mode, Source, Verdict
from tests.kerneltree import KernelTree

BASELINE = Path(__file__).resolve().parents[2] / "policies/10-baseline.yaml"
STUB = "/usr/local/libexec/kmodd/kmodd-modprobe --deny"


@pytest.fixture(scope="module")
def ctx(kernel_tree: KernelTree) -> Iterator[KmodContext]:
    # A context of its own: no modprobe.d at all, so only the rendered file counts.
    with KmodContext(kernel_tree.root, kernel_tree.release, config_paths=[]) as context:
        yield context


def compiled(tmp_path: Path, text: str, *, mode: Mode | None = None) -> CompiledPolicy:
    path = tmp_path / "p.yaml"
    path.write_text("kmodd: 1\n" + text)
    return compile_policy(load_policy_files([path]), mode=mode)


@pytest.fixture(scope="module")
def baseline() -> CompiledPolicy:
    return compile_policy(load_policy_files([BASELINE]))


def modprobe_d(tree: KernelTree, conf_dir: Path, name: str) -> list[str]:
    argv = ["modprobe", "-q", "-D", "-d", str(tree.dirname), "-S", tree.release]
    proc = subprocess.run(
        [*argv, "-C", str(conf_dir), "--", name], capture_output=True, text=True, check=False
    )
    return [line.strip() for line in proc.stdout.splitlines()]


def test_enforcement_blocks_denied_modules_in_kmod(
    kernel_tree: KernelTree, ctx: KmodContext, baseline: CompiledPolicy, tmp_path: Path
) -> None:
    text = render_enforcement(baseline, ctx, STUB)
    assert text == render_enforcement(baseline, ctx, STUB)  # deterministic
    assert f"# policy generation hash: {baseline.hash}" in text
    assert f"install algif_aead {STUB} algif_aead\nblacklist algif_aead\n" in text
    (tmp_path / "00-kmodd.conf").write_text(text)
    # Direct loads run the deny stub instead of insmod...
    assert modprobe_d(kernel_tree, tmp_path, "algif_aead")[-1] == f"install {STUB} algif_aead"
    # ...dependencies too (6pack needs ax25, which the baseline denies)...
    assert f"install {STUB} ax25" in modprobe_d(kernel_tree, tmp_path, "6pack")
    # ...and alias loads (udev, kernel requests) are skipped by the blacklist line.
    assert modprobe_d(kernel_tree, tmp_path, "net-pf-5") == []
    assert modprobe_d(kernel_tree, tmp_path, "ext4")[-1].startswith("insmod ")


def test_request_names_are_neutralised_by_install_lines(
    kernel_tree: KernelTree, ctx: KmodContext, tmp_path: Path
) -> None:
    policy = compiled(
        tmp_path,
        "rules:\n"
        "  - {id: no-hfs-mount, action: deny, match: {request: [fs-hfs*]}}\n"
        "  - {id: no-x, action: deny, match: {request: [no-such-name]}}\n",
    )
    text = render_enforcement(policy, ctx, STUB)
    # kmod normalizes install names and lookups alike ('-' == '_'): normalized forms
    assert f"install fs_hfs {STUB} fs_hfs\n" in text
    assert f"install fs_hfsplus {STUB} fs_hfsplus\n" in text
    assert f"install no_such_name {STUB} no_such_name\n" in text
    assert "blacklist fs_hfs" not in text
    assert "install hfs " not in text  # the module itself stays loadable by name
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "00-kmodd.conf").write_text(text)
    assert modprobe_d(kernel_tree, conf, "fs-hfs") == [f"install {STUB} fs_hfs"]
    assert modprobe_d(kernel_tree, conf, "hfs")[-1].startswith("insmod ")


def denied_insmods(lines: list[str], denied: set[str]) -> list[str]:
    """The `insmod PATH` lines of modprobe -D output that load a module of DENIED."""
    out = []
    for line in lines:
        if line.startswith("insmod "):
            base = line.split()[1].rsplit("/", 1)[1].split(".", 1)[0].replace("-", "_")
            if base in denied:
                out.append(line)
    return out


# kmod #446 on the real tree: modules.softdep gives these pre-softdeps, which make kmod
# ignore their install lines (ignorecmd); libcrc32c is a dependency of 130 modules.
SOFTDEP_DENIED = ("ksmbd", "btrfs", "libcrc32c", "ext4", "jbd2", "nfsd")


def test_softdep_modules_are_blocked_kmod446(
    kernel_tree: KernelTree, ctx: KmodContext, tmp_path: Path
) -> None:
    """A denied module with pre/post softdeps: without the `softdep NAME pre:` mask kmod
    30 insmods it despite `install NAME STUB` (kmod #446); with it, the install runs, by
    name, by alias (fs-btrfs) and as a dependency of an allowed module (xfs needs
    libcrc32c)."""
    modules = ", ".join(SOFTDEP_DENIED)
    policy = compiled(
        tmp_path, f"rules:\n  - {{id: no-sd, action: deny, match: {{module: [{modules}]}}}}\n"
    )
    text = render_enforcement(policy, ctx, STUB)
    assert f"softdep ksmbd pre:\ninstall ksmbd {STUB} ksmbd\nblacklist ksmbd\n" in text
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "00-kmodd.conf").write_text(text)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "00-kmodd.conf").write_text(text.replace(" pre:\n", "_unmasked pre:\n"))
    denied = set(SOFTDEP_DENIED)
    assert denied_insmods(modprobe_d(kernel_tree, bare, "ksmbd"), denied)  # the bug itself
    for name in (*SOFTDEP_DENIED, "fs-btrfs", "fs-ext4", "xfs", "nfsv4"):
        lines = modprobe_d(kernel_tree, conf, name)
        assert not denied_insmods(lines, denied), (name, lines)
    assert f"install {STUB} ksmbd" in modprobe_d(kernel_tree, conf, "ksmbd")
    assert f"install {STUB} libcrc32c" in modprobe_d(kernel_tree, conf, "xfs")


def test_udev_source_denies_are_rendered(ctx: KmodContext, tmp_path: Path) -> None:
    """`source: [udev]` can only mean modprobe.d: udev's kmod builtin never asks the
    helper.  A `source: [kernel]` deny is the helper's and stays out of the file."""
    policy = compiled(
        tmp_path,
        "rules:\n"
        "  - {id: no-usb-disk, action: deny, match: {module: [usb_storage, uas], source: [udev]}}\n"
        "  - {id: kern-no, action: deny, match: {module: [coda], source: [kernel]}}\n",
    )
    assert module_verdict(policy, "usb_storage") == (Verdict.DENY, "no-usb-disk")
    assert module_verdict(policy, "coda") == (Verdict.ALLOW, "default")
    text = render_enforcement(policy, ctx, STUB)
    assert f"install usb_storage {STUB} usb_storage\n" in text
    assert f"install uas {STUB} uas\n" in text
    assert "install coda " not in text


def test_conditional_rules_are_not_rendered(ctx: KmodContext, tmp_path: Path) -> None:
    policy = compiled(
        tmp_path,
        "rules:\n"
        "  - {id: udev-ok, action: allow, match: {module: [sctp], source: [udev]}}\n"
        "  - {id: kern-no, action: deny, match: {module: [dccp], source: [kernel]}}\n"
        "  - {id: req-no, action: deny, match: {module: [udf], request: [fs-udf]}}\n"
        "  - {id: no-sctp, action: deny, match: {module: [sctp, dccp]}}\n",
    )
    assert module_verdict(policy, "udf") == (Verdict.ALLOW, "default")
    assert module_verdict(policy, "sctp") is None
    assert module_verdict(policy, "dccp") == (Verdict.DENY, "no-sctp")
    assert module_verdict(policy, "ext4") == (Verdict.ALLOW, "default")
    text = render_enforcement(policy, ctx, STUB)
    assert "install dccp " in text
    assert "install sctp " not in text


def test_permissive_renders_a_header_only(ctx: KmodContext, baseline: CompiledPolicy) -> None:
    permissive = compile_policy(load_policy_files([BASELINE]), mode=Mode.PERMISSIVE)
    text = render_enforcement(permissive, ctx, STUB)
    assert all(line.startswith("#") for line in text.splitlines())
    assert "permissive" in text


def test_snapshot_format_and_verdicts(
    ctx: KmodContext, baseline: CompiledPolicy, tmp_path: Path
) -> None:
    data = render_snapshot(baseline, ctx, decide, 7, "/usr/sbin/modprobe")
    path = tmp_path / "snapshot"
    path.write_bytes(data)
    assert helper.read_snapshot(str(path)) == data
    header = helper.snapshot_header(data)
    assert header == {
        b"generation": b"7",
        b"mode": b"enforce",
        b"modprobe": b"/usr/sbin/modprobe",
        b"hash": baseline.hash.encode(),
    }
    lookups = {
        "net_pf_5": (b"d", b"legacy-net-protocols"),
        "algif_aead": (b"d", b"copy-fail"),
        "6pack": (b"d", b"legacy-net-protocols"),
        "ext4": (b"a", b"default"),
        "fs_hfs": (b"d", b"rare-filesystems"),
        "net_pf_2_proto_132": (b"d", b"rare-net-sctp"),
    }
    for key, expected in lookups.items():
        assert helper.snapshot_lookup(data, key.encode()) == expected, key
    assert helper.snapshot_lookup(data, b"net-pf-5") is None  # keys are normalized
    table = data.split(b"\n\n", 1)[1].split(b"\n" + helper.SNAPSHOT_GLOBS)[0].splitlines()
    keys = [line.split(b" ")[0] for line in table]
    assert keys == sorted(set(keys))
    assert len(keys) >= len(ctx.module_names())
    assert all(len(line.split(b" ")) == 3 for line in table)


def test_exact_request_aliases(ctx: KmodContext) -> None:
    aliases = exact_request_aliases(ctx)
    assert "net_pf_5" in aliases
    assert "fs_ext4" in aliases
    assert all("*" not in a and "[" not in a for a in aliases)
    assert not any(a.startswith("pci:") for a in aliases)


def test_unsafe_modprobe_path_is_refused(ctx: KmodContext, baseline: CompiledPolicy) -> None:
    with pytest.raises(ValueError, match="absolute"):
        render_snapshot(baseline, ctx, decide, 1, "modprobe\nmode permissive")


def test_rendered_denials_agree_with_live_decisions(ctx: KmodContext, tmp_path: Path) -> None:
    """Whatever the enforcement file blocks, decide() denies for every source: kmod can
    never refuse a load the live policy allowed (baseline + the example site policy)."""
    example = tmp_path / "05-site.yaml"
    example.write_text((BASELINE.parent / "example-site.yaml.example").read_text())
    policy = compile_policy(load_policy_files([example, BASELINE]), mode=Mode.ENFORCE)
    denied = [m for m in ctx.module_names() if (module_verdict(policy, m) or (None,))[0] == "deny"]
    assert "algif_aead" in denied
    assert "udf" not in denied  # allowed by the site policy
    assert "thunderbolt" not in denied  # allowed for udev only: not renderable
    for module in denied:
        # udev and cli (admin modprobe) are what modprobe.d serves; a source-only udev
        # deny also catches kernel requests, which kmodd.policy.coverage reports.
        for source in (Source.UDEV, Source.CLI, Source.KERNEL):
            decision = decide(Request(module, source), ctx.resolve(module), policy)
            assert decision.verdict is Verdict.DENY, (module, source)


def test_request_rules_never_render_module_names(ctx: KmodContext, tmp_path: Path) -> None:
    """`install ext4 …` would also block fs-ext4, which the rule below does not deny."""
    policy = compiled(
        tmp_path, "rules:\n  - {id: no-name, action: deny, match: {request: [ext4, 'fs-ext*']}}\n"
    )
    text = render_enforcement(policy, ctx, STUB)
    assert "install ext4 " not in text
    assert f"install fs_ext4 {STUB} fs_ext4\n" in text
    assert decide(Request("fs-ext4"), ctx.resolve("fs-ext4"), policy).verdict is Verdict.DENY
