"""`kmodctl schema`: the policy JSON Schema, draft-07 (what yaml-language-server speaks)."""

from __future__ import annotations

import argparse
from typing import Any

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode
from pydantic_core import CoreSchema

from kmodd.cli.common import print_json
from kmodd.policy.model import PolicyFile

DRAFT_07 = "http://json-schema.org/draft-07/schema#"


class Draft07(GenerateJsonSchema):
    """pydantic emits 2020-12 without saying so; yaml-language-server supports draft-07
    and below (research/python-ecosystem.md §4.5), and `$defs` refs resolve as JSON
    pointers there, so only the `$schema` key is needed."""

    def generate(self, schema: CoreSchema, mode: JsonSchemaMode = "validation") -> Any:
        out = super().generate(schema, mode=mode)
        return {"$schema": DRAFT_07, **out}


def policy_schema() -> dict[str, Any]:
    return PolicyFile.model_json_schema(by_alias=True, schema_generator=Draft07)


def run(args: argparse.Namespace) -> int:
    del args
    print_json(policy_schema())
    return 0
