"""`kmodctl schema`: draft-07 JSON Schema with descriptions for editors."""

from __future__ import annotations

import json

import jsonschema
import pytest

from kmodd.cli.main import main


def test_schema_is_draft_07_with_descriptions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"kmodd"}
    match = schema["$defs"]["Match"]
    assert "class" in match["properties"]
    assert "'-' and '_' are equal" in match["properties"]["module"]["description"]
    assert schema["$defs"]["Rule"]["properties"]["action"]["$ref"] == "#/$defs/Action"


def test_every_field_is_described(capsys: pytest.CaptureFixture[str]) -> None:
    """Every property of every object in the schema, the requester keys included."""
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    objects = {"PolicyFile": schema} | {
        name: node for name, node in schema["$defs"].items() if "properties" in node
    }
    assert set(objects) == {"PolicyFile", "Rule", "Match", "RequesterMatch"}
    for name, node in objects.items():
        for key, prop in node["properties"].items():
            assert prop.get("description"), f"{name}.{key}"
    requester = objects["RequesterMatch"]["properties"]
    assert set(requester) == {"uid", "gid", "unprivileged", "unit", "container"}
    assert "initial user namespace" in requester["uid"]["description"]
