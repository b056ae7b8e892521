"""The libbpf binding on the host: the shipped object opens (no load: this machine's
kernel has no BPF LSM), its maps are what kmodd/bpf/layout.py expects, and map fds work
against the host kernel's bpf() (maps need no LSM)."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodd.bpf import layer, layout, libbpf
from kmodd.bpf.layer import KernelLayer
from kmodd.bpf.libbpf import BpfError, MapType

EXPECTED = {
    # name: (type, key_size, value_size, max_entries)
    "kmodd_config": (MapType.ARRAY, 4, ctypes.sizeof(layout.ConfigC), 1),
    "kmodd_names": (MapType.ARRAY_OF_MAPS, 4, 4, 1),
    "kmodd_files": (MapType.ARRAY_OF_MAPS, 4, 4, 1),
    "kmodd_events": (MapType.RINGBUF, 0, 0, 256 * 1024),
    "kmodd_stats": (MapType.PERCPU_ARRAY, 4, 8, len(layout.Stat)),
}


def test_the_shipped_object_opens_and_has_the_expected_maps() -> None:
    with libbpf.BpfObject(str(layer.object_path())) as obj:
        maps = {m.name: (m.type, m.key_size, m.value_size, m.max_entries) for m in obj.maps()}
    assert maps == EXPECTED
    assert set(maps) == set(layer.MAPS)


def test_a_missing_object_is_a_typed_error_with_errno(tmp_path: Path) -> None:
    with pytest.raises(BpfError) as err:
        libbpf.BpfObject(str(tmp_path / "nope.bpf.o"))
    assert err.value.errno == 2
    assert err.value.hint


def test_a_closed_object_refuses_use() -> None:
    obj = libbpf.BpfObject(str(layer.object_path()))
    obj.close()
    obj.close()  # idempotent
    with pytest.raises(BpfError, match="closed"):
        obj.maps()


def _can_create_maps() -> bool:
    try:
        os.close(libbpf.map_create(MapType.ARRAY, "probe", 4, 4, 1))
    except BpfError:
        return False
    return True


needs_bpf = pytest.mark.skipif(
    os.geteuid() != 0 or not _can_create_maps(), reason="bpf() map creation needs root"
)


@pytest.fixture
def host_layer() -> Iterator[KernelLayer]:
    """A KernelLayer on maps created here (config, stats, ring), not pinned."""
    fds = {
        "kmodd_config": libbpf.map_create(MapType.ARRAY, "cfg", 4, 16, 1),
        "kmodd_stats": libbpf.map_create(MapType.PERCPU_ARRAY, "st", 4, 8, len(layout.Stat)),
        "kmodd_events": libbpf.map_create(MapType.RINGBUF, "ev", 0, 0, 4096),
    }
    with KernelLayer(Path("/nonexistent"), fds, adopted=False) as kl:
        yield kl


@needs_bpf
def test_hash_map_round_trip_and_keys() -> None:
    fd = libbpf.map_create(MapType.HASH, "t", layout.NAME_LEN, 304, 4)
    try:
        rows = layout.names_table({"a": layout.NameRules(), "net-pf-5": layout.NameRules()})
        for key, value in rows:
            libbpf.map_update(fd, key, value)
        assert sorted(libbpf.map_keys(fd, layout.NAME_LEN)) == sorted(k for k, _ in rows)
        assert libbpf.map_lookup(fd, rows[1][0], 304) == rows[1][1]
        assert libbpf.map_lookup(fd, layout.encode_name("other"), 304) is None
        with pytest.raises(BpfError):  # full: 4 entries
            for i in range(5):
                libbpf.map_update(fd, layout.encode_name(f"x{i}"), bytes(304))
    finally:
        os.close(fd)


@needs_bpf
def test_config_and_stats_through_the_layer(host_layer: KernelLayer) -> None:
    host_layer.set_config(layout.Mode.PERMISSIVE, layout.Verdict.DENY, 7)
    cfg = host_layer.config()
    assert (cfg.mode, cfg.load_data, cfg.generation) == (1, 2, 7)
    assert host_layer.stats() == dict.fromkeys(layout.Stat, 0)


@needs_bpf
def test_an_empty_ring_buffer_polls_nothing_and_closes(host_layer: KernelLayer) -> None:
    with host_layer.events() as reader:
        assert reader.read(0) == []
        assert reader.fileno() >= 0


@needs_bpf
def test_a_closed_layer_releases_its_fds(host_layer: KernelLayer) -> None:
    fd = host_layer.fd("kmodd_config")
    host_layer.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(BpfError, match="closed"):
        host_layer.fd("kmodd_config")


def test_adopting_nothing_is_a_typed_error(tmp_path: Path) -> None:
    assert not KernelLayer.pinned(tmp_path)
    with pytest.raises(BpfError):
        KernelLayer.adopt(tmp_path)


def test_installing_outside_bpffs_is_refused_with_the_mount_hint(tmp_path: Path) -> None:
    with pytest.raises(BpfError) as err:
        KernelLayer.install(tmp_path / "kmodd")
    assert "mount -t bpf" in (err.value.hint or "")


def test_possible_cpus_counts_every_listed_cpu() -> None:
    assert layer.parse_cpu_list("0") == 1
    assert layer.parse_cpu_list("0-3,6\n") == 5
