"""Load policy drop-ins into one validated PolicySet, or report every problem at once.

Drop-in rules (design §5.2): the dirs kmodd.paths.POLICY_DIRS under the root, lowest to
highest; only `*.yaml` (not hidden); a file in a higher dir replaces the same basename in
a lower one; a symlink to /dev/null masks the basename; files apply in basename order.
Nothing half-applies: any problem in any file raises InvalidInputError with all of them.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Collection, Sequence
from pathlib import Path

from pydantic import ValidationError

from kmodd import bootpublish
from kmodd.errors import InvalidInputError, Issue
from kmodd.paths import POLICY_DIRS, Paths
from kmodd.policy.model import Action, LocatedRule, Mode, PolicyFile, PolicySet, PolicySource
from kmodd.policy.yamlnodes import Document, Mark, Path_, load_document

# A real policy is a few KB; 1 MiB holds ~40,000 rules and still parses in ~0.2 s.
MAX_FILE_BYTES = 1 << 20
SUFFIX = ".yaml"
_DEV_NULL = "/dev/null"


def collect_policy_files(paths: Paths) -> tuple[list[Path], list[Path]]:
    """The effective policy files in basename order, and the masked paths."""
    chosen: dict[str, Path] = {}
    for directory in paths.policy_dirs:  # lowest → highest: later ones replace
        try:
            names = sorted(entry.name for entry in directory.iterdir())
        except FileNotFoundError:
            continue
        except OSError as err:
            raise InvalidInputError(
                [Issue(str(directory), 0, 0, f"cannot list policy dir: {err.strerror}")],
                what="policy",
            ) from None
        _check_dir(directory)
        for name in names:
            if name.endswith(SUFFIX) and not name.startswith("."):
                chosen[name] = directory / name
    files = [chosen[name] for name in sorted(chosen)]
    masked = [p for p in files if _is_mask(p)]
    return [p for p in files if p not in masked], masked


def collect_shipped_files(paths: Paths) -> tuple[list[Path], list[Path]]:
    """The shipped policy (the lowest dir: what the package installed), in basename order,
    minus the basenames a higher dir masks; and those masks.  A shipped file that a higher
    dir replaces is kept: the replacement may be what is broken (kmodd.daemon.lastgood)."""
    try:
        _files, masked = collect_policy_files(paths)
    except InvalidInputError:
        masked = []  # a refused (unsafe, unlistable) dir's masks are nobody's word
    shipped_dir = paths.policy_dirs[0]
    masked_names = {p.name for p in masked}
    try:
        names = sorted(entry.name for entry in shipped_dir.iterdir())
    except OSError:
        return [], masked
    _check_dir(shipped_dir)
    shipped = [
        shipped_dir / name
        for name in names
        if name.endswith(SUFFIX) and not name.startswith(".") and name not in masked_names
    ]
    return [p for p in shipped if not _is_mask(p)], masked


def _check_dir(directory: Path) -> None:
    """Whoever can write a policy dir can delete or mask root's files in it, and whoever
    can write (or owns) one of its parents can rename it away: both refused like an
    unsafe file (a vanished dir is then caught by check_lost_dirs)."""
    try:
        unsafe = _unsafe_owner_or_mode(directory.stat())
        hint = f"chown root {directory} && chmod go-w {directory}"
        parent = None if unsafe is not None else bootpublish.unsafe_parent(str(directory))
        if parent is not None:
            where, why = parent
            unsafe = f"is unsafe: its parent {where} is {why}, who could move it away"
            hint = f"chown root:root {where} && chmod go-w {where}, or move the policy dir"
    except OSError as err:
        unsafe = f"cannot stat: {err.strerror}"
    if unsafe is not None:
        issue = Issue(str(directory), 0, 0, f"policy dir {unsafe}", hint)
        raise InvalidInputError([issue], what="policy")


def dirs_in_use(paths: Paths) -> tuple[str, ...]:
    """The policy dirs (relative to the root) that hold at least one policy file or mask:
    what a later generation must not silently lose (check_lost_dirs)."""
    found = []
    for rel, directory in zip(POLICY_DIRS, paths.policy_dirs, strict=True):
        try:
            names = [entry.name for entry in directory.iterdir()]
        except OSError:
            continue
        if any(n.endswith(SUFFIX) and not n.startswith(".") for n in names):
            found.append(rel)
    return tuple(found)


def check_lost_dirs(paths: Paths, previous: Sequence[str], accepted: Collection[str]) -> None:
    """Refuse a generation that lost a policy dir the last good one had files in (moved
    away, unmounted, deleted), unless the admin said so (`kmodctl reload --accept-removed
    DIR`): a reload with zero files would quietly allow everything the dir denied.
    Not the runtime dir (run/kmodd/policy.d): it is gone after every reboot by design,
    and only root may remove it (its parents are checked like every policy dir's)."""
    issues = []
    for rel in previous:
        directory = paths.root / rel
        volatile = rel == POLICY_DIRS[-1]
        if rel in accepted or rel not in POLICY_DIRS or volatile or directory.is_dir():
            continue
        message = "policy dir is gone, but the last good generation had policy files in it"
        hint = f"restore it; to drop it on purpose: kmodctl reload --accept-removed /{rel}"
        issues.append(Issue(str(directory), 0, 0, message, hint))
    if issues:
        raise InvalidInputError(issues, what="policy")


def _is_mask(path: Path) -> bool:
    """A symlink to /dev/null (also when --root is not /: the link text is what counts)."""
    try:
        if path.is_symlink() and str(path.readlink()) == _DEV_NULL:
            return True
        st = path.stat()
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


def read_policy_bytes(path: Path) -> bytes:
    """The file's bytes, refusing non-regular files (FIFOs would block) and huge files."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as err:
        raise _single(path, f"cannot open: {err.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _single(path, "not a regular file")
        unsafe = _unsafe_owner_or_mode(st)
        if unsafe is not None:
            raise _single(path, unsafe, "chown root and chmod go-w the policy file")
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise _single(
            path,
            f"file is larger than {MAX_FILE_BYTES} bytes",
            "split it into several drop-ins or simplify it",
        )
    return data


def _unsafe_owner_or_mode(st: os.stat_result) -> str | None:
    """Policy decides what root loads: a file another user can write is refused (as
    USBGuard does).  Owned by root or by whoever runs us (kmodctl validate on one's own
    draft), never world-writable, and group-writable only by root's group (or ours)."""
    if st.st_uid not in (0, os.geteuid()):
        return f"owned by uid {st.st_uid}, not root"
    if st.st_mode & stat.S_IWOTH:
        return "writable by every user"
    if st.st_mode & stat.S_IWGRP and st.st_gid not in (0, os.getegid()):
        return f"writable by group {st.st_gid}"
    return None


def _single(path: Path, message: str, hint: str | None = None) -> InvalidInputError:
    return InvalidInputError([Issue(str(path), 0, 0, message, hint)], what=str(path))


def load_policy(paths: Paths, *, shipped_only: bool = False) -> PolicySet:
    """Load the drop-in dirs under the root of PATHS (see the module docstring); with
    SHIPPED_ONLY the shipped files alone (collect_shipped_files)."""
    files, masked = (collect_shipped_files if shipped_only else collect_policy_files)(paths)
    policy = load_policy_files(files)
    return PolicySet(
        files=policy.files,
        rules=policy.rules,
        mode=policy.mode,
        default=policy.default,
        mode_from=policy.mode_from,
        default_from=policy.default_from,
        unknown_requester=policy.unknown_requester,
        unknown_requester_from=policy.unknown_requester_from,
        masked=tuple(str(p) for p in masked),
        hash=policy.hash,
    )


def load_policy_files(files: Sequence[Path]) -> PolicySet:
    """Load FILES in the order given; raise InvalidInputError listing every problem."""
    issues: list[Issue] = []
    parsed: list[tuple[Path, bytes, PolicyFile, Document]] = []
    docs: list[tuple[Path, Document]] = []
    for path in files:
        try:
            data = read_policy_bytes(path)
        except InvalidInputError as err:
            issues.extend(err.issues)
            continue
        policy, doc, problems = parse_policy(data, str(path))
        issues.extend(problems)
        if doc is not None:
            docs.append((path, doc))
        if policy is not None and doc is not None:
            parsed.append((path, data, policy, doc))
    issues.extend(_duplicate_ids(docs))
    if issues:
        order = {str(path): index for index, path in enumerate(files)}
        issues.sort(key=lambda i: (order.get(i.path, len(order)), i.line, i.column))
        raise InvalidInputError(issues, what="policy")
    return _merge(parsed)


def parse_policy(data: bytes, path: str) -> tuple[PolicyFile | None, Document | None, list[Issue]]:
    """Validate one file's bytes: (model, document, issues).  Never raises for bad input.

    The document is returned whenever the YAML parsed, even if validation failed, so
    cross-file checks (unique rule ids) still see it.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        column = err.start - data.rfind(b"\n", 0, err.start)  # 1-based, in bytes
        message = f"not valid UTF-8 (byte 0x{data[err.start]:02x})"
        return None, None, [Issue(path, line, column, message, "policy files are UTF-8")]
    if "\0" in text:
        return None, None, [Issue(path, 0, 0, "file contains NUL bytes")]
    doc, issues = load_document(text, path)
    if doc is None:
        return None, None, issues
    if not isinstance(doc.data, dict):
        hint = "start the file with `kmodd: 1`"
        mark = doc.marks.get((), Mark(1, 1))
        what = "empty" if doc.data is None else f"a {type(doc.data).__name__}"
        message = f"a policy file is a mapping, this one is {what}"
        return None, doc, [Issue(path, mark.line, mark.column, message, hint)]
    try:
        return PolicyFile.model_validate(doc.data), doc, []
    except ValidationError as err:
        return None, doc, [_issue(path, doc, e) for e in err.errors(include_url=False)]


def _issue(path: str, doc: Document, error: object) -> Issue:
    assert isinstance(error, dict)
    loc, where = _walk(doc, tuple(error["loc"]))
    kind = error["type"]
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind == "extra_forbidden" and where in doc.key_marks:
        mark = doc.key_marks[where]
        message = f"unknown key {where[-1]!r}"
    else:
        mark = _nearest_mark(doc, where)
        if kind == "missing":
            message = f"missing required key {loc[-1]!r}"
    text = f"{_dotted(loc)}: {message}" if loc else message
    return Issue(path, mark.line, mark.column, text, _hint(kind, error.get("input")))


def _walk(doc: Document, loc: tuple[object, ...]) -> tuple[Path_, Path_]:
    """Map a pydantic loc onto the data: (loc for the message, path in the data).

    Union members add loc parts that are not keys (e.g. 'list[str]'): skip those.
    """
    node: object = doc.data
    shown: list[str | int] = []
    path: list[str | int] = []
    for part in loc:
        if isinstance(node, dict) and part in node:
            assert isinstance(part, str | int)
            node = node[part]
            path.append(part)
            shown.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            path.append(part)
            shown.append(part)
        elif isinstance(part, str) and isinstance(node, dict):
            shown.append(part)  # a missing key: point at its parent mapping
    return tuple(shown), tuple(path)


def _nearest_mark(doc: Document, path: Path_) -> Mark:
    for end in range(len(path), -1, -1):
        mark = doc.marks.get(path[:end])
        if mark is not None:
            return mark
    return Mark(1, 1)


def _dotted(loc: Path_) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _hint(kind: str, value: object) -> str | None:
    if kind in {"string_type", "enum", "literal_error"} and isinstance(value, bool):
        return 'quote it ("no", "off") if you meant a string'
    if kind == "list_type":
        return "write a YAML list: [a, b] or one '- item' per line"
    if kind == "extra_forbidden":
        return "check the spelling against `kmodctl schema`"
    if kind == "missing":
        return "see `kmodctl schema` for the required keys"
    return None


def _duplicate_ids(docs: list[tuple[Path, Document]]) -> list[Issue]:
    """Rule ids are unique across all files; checked on the raw data of every file."""
    seen: dict[str, str] = {}
    issues = []
    for path, doc in docs:
        rules = doc.data.get("rules") if isinstance(doc.data, dict) else None
        if not isinstance(rules, list):
            continue
        for index, rule in enumerate(rules):
            rule_id = rule.get("id") if isinstance(rule, dict) else None
            if not isinstance(rule_id, str):
                continue
            mark = doc.marks.get(("rules", index, "id"), Mark(1, 1))
            if rule_id in seen:
                message = f"rules[{index}].id: duplicate rule id {rule_id!r}"
                hint = f"first defined at {seen[rule_id]}; rule ids are unique across files"
                issues.append(Issue(str(path), mark.line, mark.column, message, hint))
            else:
                seen[rule_id] = f"{path}:{mark.line}"
    return issues


def _merge(parsed: list[tuple[Path, bytes, PolicyFile, Document]]) -> PolicySet:
    digest = hashlib.sha256()
    sources, rules = [], []
    mode_from = default_from = unknown_from = None
    mode, default, unknown = Mode.ENFORCE, Action.ALLOW, Action.DENY
    for path, data, policy, doc in parsed:
        digest.update(path.name.encode() + b"\0" + data + b"\0")
        sources.append(PolicySource(str(path), hashlib.sha256(data).hexdigest()))
        if policy.mode is not None:
            mode, mode_from = policy.mode, str(path)
        if policy.default is not None:
            default, default_from = policy.default, str(path)
        if policy.unknown_requester is not None:
            unknown, unknown_from = policy.unknown_requester, str(path)
        for index, rule in enumerate(policy.rules):
            mark = doc.marks.get(("rules", index), Mark(0, 0))
            rules.append(LocatedRule(rule, str(path), mark.line, mark.column))
    return PolicySet(
        files=tuple(sources),
        rules=tuple(rules),
        mode=mode,
        default=default,
        mode_from=mode_from,
        default_from=default_from,
        unknown_requester=unknown,
        unknown_requester_from=unknown_from,
        hash=digest.hexdigest(),
    )
