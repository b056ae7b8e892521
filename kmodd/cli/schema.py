"""`kmodctl schema`: the policy JSON Schema, draft-07 (what yaml-language-server speaks)."""

from __future__ import annotations

import argparse
import ast
import inspect
import itertools
import textwrap
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode
from pydantic_core import CoreSchema

from kmodd.cli.common import print_json
from kmodd.policy.model import Match, PolicyFile, RequesterMatch, Rule

# Every model of a policy file: each field's docstring becomes its description.
MODELS: tuple[type[BaseModel], ...] = (PolicyFile, Rule, Match, RequesterMatch)

DRAFT_07 = "http://json-schema.org/draft-07/schema#"


class Draft07(GenerateJsonSchema):
    """pydantic emits 2020-12 without saying so; yaml-language-server supports draft-07
    and below (research/python-ecosystem.md §4.5), and `$defs` refs resolve as JSON
    pointers there, so only the `$schema` key is needed."""

    def generate(self, schema: CoreSchema, mode: JsonSchemaMode = "validation") -> Any:
        out = super().generate(schema, mode=mode)
        return {"$schema": DRAFT_07, **out}


def field_docstrings(model: type[BaseModel]) -> dict[str, str]:
    """The docstring written under each field of MODEL's class body (the descriptions
    editors show on hover)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(model)))
    body = tree.body[0].body if isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for field_node, doc_node in itertools.pairwise(body):
        if (
            isinstance(field_node, ast.AnnAssign)
            and isinstance(field_node.target, ast.Name)
            and isinstance(doc_node, ast.Expr)
            and isinstance(doc_node.value, ast.Constant)
            and isinstance(doc_node.value.value, str)
        ):
            docs[field_node.target.id] = inspect.cleandoc(doc_node.value.value)
    return docs


def policy_schema() -> dict[str, Any]:
    schema = PolicyFile.model_json_schema(by_alias=True, schema_generator=Draft07)
    for model in MODELS:
        node = schema if model is PolicyFile else schema["$defs"][model.__name__]
        docs = field_docstrings(model)
        for name, info in model.model_fields.items():
            key = info.alias or name
            if name in docs and key in node["properties"]:
                node["properties"][key]["description"] = docs[name]
    return schema


def run(args: argparse.Namespace) -> int:
    del args
    print_json(policy_schema())
    return 0
