"""Hostile-input-safe YAML: libyaml speed, no surprises, and a mark for every value.

PyYAML's safe loader has three traps for a policy language (research/python-ecosystem.md
§4.4): YAML 1.1 turns `no`/`off`/`yes`/`on` into booleans, duplicate keys silently keep
the last value, and aliases let 1 KB expand into gigabytes ("billion laughs").  We let
libyaml compose the node graph (C speed; ~20 ms for a 6,000-line file; libyaml itself
caps flow nesting at 1,000) and build the Python data ourselves, refusing duplicates,
aliases and deep nesting, and recording the line/column of every key and value so
pydantic errors can be reported as FILE:LINE:COL.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

import yaml

from kmodd.errors import Issue

# A policy nests mapping → rules → rule → match → list → item: 6 levels.  32 is generous
# and keeps our recursive walk far from Python's recursion limit.
MAX_DEPTH = 32
MAX_NODES = 200_000

_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_BOOL_TAG = "tag:yaml.org,2002:bool"
_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")

Path_ = tuple[str | int, ...]
_COLLECTION_TAGS: dict[type[yaml.Node], str] = {
    yaml.MappingNode: "tag:yaml.org,2002:map",
    yaml.SequenceNode: "tag:yaml.org,2002:seq",
}


class StrictLoader(_BaseLoader):  # type: ignore[valid-type,misc]
    """CSafeLoader whose booleans are only true/false (YAML 1.2 core schema)."""


# Resolvers are a class-level dict keyed by first character: copy it, drop every bool
# resolver, and re-add the YAML 1.2 spellings only.
StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in _BaseLoader.yaml_implicit_resolvers.items()
}
StrictLoader.add_implicit_resolver(_BOOL_TAG, _BOOL_RE, list("tTfF"))


@dataclass(frozen=True, slots=True)
class Mark:
    line: int  # 1-based
    column: int  # 1-based


@dataclass
class Document:
    """Plain data built from one YAML document, with marks for values and keys."""

    data: object
    marks: dict[Path_, Mark] = field(default_factory=dict)
    key_marks: dict[Path_, Mark] = field(default_factory=dict)


class YamlProblem(Exception):
    """A located problem found while building the data (turned into an Issue)."""

    def __init__(self, mark: Mark, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.mark = mark
        self.message = message
        self.hint = hint


class LineIndex:
    """Line/column of a character offset, counting only '\\n' as a line break.

    libyaml also breaks lines at '\\r', U+0085, U+2028 and U+2029, so its own line
    numbers drift from what `grep -n` and editors show; its marks' `index` (in
    characters) does not, so every reported position is recomputed from it."""

    def __init__(self, text: str) -> None:
        self.starts = [0, *(m.end() for m in re.finditer("\n", text))]

    def at(self, index: int) -> Mark:
        line = bisect.bisect_right(self.starts, index)
        return Mark(line, index - self.starts[line - 1] + 1)


class _Builder:
    def __init__(self, loader: StrictLoader, doc: Document, lines: LineIndex) -> None:
        self.loader = loader
        self.doc = doc
        self.lines = lines
        self.seen: set[int] = set()

    def _mark(self, node: yaml.Node) -> Mark:
        return self.lines.at(node.start_mark.index)

    def build(self, node: yaml.Node, path: Path_) -> object:
        if id(node) in self.seen:
            raise YamlProblem(
                self._mark(node),
                "YAML aliases (*name) are not allowed in policy files",
                "write the value out; aliases can expand a small file into gigabytes",
            )
        self.seen.add(id(node))
        if len(self.seen) > MAX_NODES:
            raise YamlProblem(self._mark(node), f"more than {MAX_NODES} YAML nodes")
        if len(path) > MAX_DEPTH:
            raise YamlProblem(self._mark(node), f"nesting deeper than {MAX_DEPTH} levels")
        self.doc.marks[path] = self._mark(node)
        expected = _COLLECTION_TAGS.get(type(node))
        if expected is not None and node.tag != expected:
            raise YamlProblem(self._mark(node), f"unsupported YAML tag {node.tag!r}")
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        return self._scalar(node)

    def _scalar(self, node: yaml.Node) -> object:
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as err:
            raise YamlProblem(self._mark(node), str(err.problem or err)) from None
        except (ValueError, OverflowError) as err:  # e.g. a timestamp out of range
            raise YamlProblem(self._mark(node), f"bad scalar: {err}") from None

    def _mapping(self, node: yaml.MappingNode, path: Path_) -> dict[object, object]:
        out: dict[object, object] = {}
        first: dict[object, Mark] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlProblem(self._mark(key_node), "mapping keys must be plain scalars")
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise YamlProblem(self._mark(key_node), "merge keys (<<) are not allowed")
            key = self._scalar(key_node)
            if not isinstance(key, str | int):
                key = str(key)
            if key in first:
                where = first[key]
                raise YamlProblem(
                    self._mark(key_node),
                    f"duplicate key {key!r}",
                    f"first at line {where.line} column {where.column}; remove one of them",
                )
            first[key] = self._mark(key_node)
            self.doc.key_marks[(*path, key)] = self._mark(key_node)
            out[key] = self.build(value_node, (*path, key))
        return out


def load_document(text: str, path: str) -> tuple[Document | None, list[Issue]]:
    """Parse TEXT (one YAML document).  Returns (document, []) or (None, issues)."""
    loader = StrictLoader(text)
    try:
        node = loader.get_single_node()
        doc = Document(None)
        if node is not None:
            doc.data = _Builder(loader, doc, LineIndex(text)).build(node, ())
    except (yaml.YAMLError, YamlProblem, RecursionError) as err:
        return None, [_error_issue(err, text, path)]
    finally:
        loader.dispose()
    return doc, []


def _error_issue(err: Exception, text: str, path: str) -> Issue:
    if isinstance(err, YamlProblem):
        return Issue(path, err.mark.line, err.mark.column, err.message, err.hint)
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = LineIndex(text).at(mark.index) if mark is not None else Mark(0, 0)
        line, col = where.line, where.column
        problem = err.problem or err.context or "invalid YAML"
        tabs = "tab" in problem or ("\t" in text and "token" in problem)
        hint = "indent with spaces, not tabs" if tabs else None
        return Issue(path, line, col, f"YAML syntax: {problem}", hint)
    if isinstance(err, yaml.reader.ReaderError):  # no mark, only a character offset
        where = LineIndex(text).at(err.position)
        code = err.character if isinstance(err.character, int) else ord(err.character)
        message = f"YAML: unacceptable character #x{code:04x}: {err.reason}"
        return Issue(path, where.line, where.column, message)
    if isinstance(err, RecursionError):
        return Issue(path, 0, 0, "YAML nesting too deep")
    return Issue(path, 0, 0, f"YAML: {err}")
