"""The plain answer types."""

from __future__ import annotations

import dataclasses

import pytest

from kmodd.kmod.model import ConfigLine, LoadStep, Resolution, StepKind


def test_resolution_views() -> None:
    steps = (
        LoadStep("llc", StepKind.INSMOD, path="/m/llc.ko"),
        LoadStep("appletalk", StepKind.INSTALL, command="/bin/false"),
    )
    res = Resolution(request="net-pf-5", modules=("appletalk",), steps=steps)
    assert res.load_set == ("llc", "appletalk")
    assert res.resolved
    assert not Resolution(request="x", modules=(), steps=()).resolved
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.request = "y"  # type: ignore[misc]


def test_config_line_location_and_default_value() -> None:
    line = ConfigLine(path="/etc/modprobe.d/a.conf", line=7, directive="blacklist",
                      target="dccp", text="blacklist dccp")  # fmt: skip
    assert line.location() == "/etc/modprobe.d/a.conf:7"
    assert line.value == ""
