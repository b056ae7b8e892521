"""Name corpora for the oracle: module names, kernel-request aliases, device modaliases."""

from __future__ import annotations

import random
from pathlib import Path

from kmodd.kmod import libkmod

# '*' fills, cycled so wildcards are exercised with empty and non-empty text.
STAR_FILLS = ("", "7", "0a")
# Aliases with a ':' are device modaliases (udev's MODALIAS), except these request-shaped
# prefixes the kernel itself asks for.
REQUEST_COLON_PREFIXES = ("devname:", "ip_set_", "symbol:")


def _pick_from_class(body: str) -> str:
    negated = body[:1] in ("!", "^")
    if negated:
        body = body[1:]
    chars: set[str] = set()
    i = 0
    while i < len(body):
        if i + 2 < len(body) and body[i + 1] == "-":
            chars.update(chr(c) for c in range(ord(body[i]), ord(body[i + 2]) + 1))
            i += 3
        else:
            chars.add(body[i])
            i += 1
    if not negated:
        return min(chars)
    return next(c for c in "0aZ_x9" if c not in chars)


def instantiate(pattern: str, variant: int = 0) -> str:
    """A concrete name the fnmatch pattern matches: '*' -> a fill, '?' -> '0',
    '[class]' -> a member (or a non-member for '[!class]')."""
    out: list[str] = []
    i = 0
    stars = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append(STAR_FILLS[(variant + stars) % len(STAR_FILLS)])
            stars += 1
        elif c == "?":
            out.append("0")
        elif c == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            out.append(_pick_from_class(pattern[i + 1 : end]))
            i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(pattern[i])
        else:
            out.append(c)
        i += 1
    name = "".join(out)
    return name if libkmod.fnmatch(pattern, name) else pattern.replace("*", "")


def alias_lines(module_dir: Path) -> list[tuple[str, str]]:
    """(pattern, module) of the text modules.alias: patterns as the kernel spells them."""
    pairs = []
    for line in (module_dir / "modules.alias").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "alias":
            pairs.append((parts[1], parts[2]))
    return pairs


def is_request_shaped(pattern: str) -> bool:
    return ":" not in pattern or pattern.startswith(REQUEST_COLON_PREFIXES)


def request_names(module_dir: Path) -> list[str]:
    """Every request-shaped alias (net-pf-*, fs-*, crypto-*, char-major-*, devname:*, ...),
    wildcards instantiated twice (empty and non-empty fills)."""
    names: dict[str, None] = {}
    for pattern, _ in alias_lines(module_dir):
        if is_request_shaped(pattern):
            names[instantiate(pattern, 0)] = None
            if any(ch in pattern for ch in "*?["):
                names[instantiate(pattern, 1)] = None
    return list(names)


def modalias_names(module_dir: Path) -> list[str]:
    """Every device modalias pattern instantiated once with concrete values."""
    names: dict[str, None] = {}
    for index, (pattern, _) in enumerate(alias_lines(module_dir)):
        if not is_request_shaped(pattern):
            names[instantiate(pattern, index)] = None
    return list(names)


FUZZ_ALPHABET = "abcdefxyz0123456789-_[]!*?:.^\\ "


def fuzz_names(module_dir: Path, count: int, seed: int = 20261126) -> list[str]:
    """Deterministic hostile names: random strings over kmod's special characters, and
    real aliases mutated by one character (near misses, '-'/'_' swaps, brackets)."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
    reals = [instantiate(p, i) for i, (p, _) in enumerate(alias_lines(module_dir))]
    names: dict[str, None] = {}
    while len(names) < count:
        if rng.random() < 0.5:
            name = "".join(rng.choice(FUZZ_ALPHABET) for _ in range(rng.randint(1, 60)))
        else:
            base = list(rng.choice(reals))
            pos = rng.randrange(len(base))
            base[pos] = rng.choice(FUZZ_ALPHABET + base[pos].swapcase())
            name = "".join(base)
        names[name] = None
    return list(names)
