"""What one generation build keeps for the next: an explicit object the builder owns.

Resolving the ~4,700 snapshot names through libkmod is about half of a build, dumping and
filtering modules.alias.bin (~30,000 patterns) another ~0.1-0.3 s, and a policy edit
changes neither: only modprobe.d or the module tree (depmod) does.  So the Core holds one
TreeIndex and passes it to every build (kmodd.daemon.generation.build_generation):

- the tree's alias index as (pattern, module) pairs, every pattern (wildcards included:
  the snapshot's glob rows and the renderer's reach need them all, exactly as
  KmodContext.alias_patterns gives them), keyed by the identity of modules.alias.bin
  (index_key: depmod renames a new file in, so a new index has a new inode);
- the last build's resolutions, keyed by a digest of the modprobe.d files (kmod's view,
  content included: libkmod itself only notices dir mtimes) and the identity of every
  index file, taken BEFORE the build opens its context: a change that races the build
  makes the key differ next time, never the reverse.

Plain data, never a libkmod context (that belongs to the core thread while the builder
runs).  Builds run one at a time; the lock orders one builder thread with the next.
(This replaced three process-global memos keyed by object identity.)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Generic, TypeVar

from kmodd.kmod.context import KmodContext
from kmodd.kmod.model import Resolution

RESOLUTIONS_MAX = 32_768  # the snapshot's names plus the policy's exact request names
Pairs = tuple[tuple[str, str], ...]
Key = tuple[object, ...]


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Kept(Generic[T]):
    key: Key
    value: T


class TreeIndex:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._aliases: _Kept[Pairs] | None = None
        self._resolutions: _Kept[dict[str, Resolution]] | None = None

    def alias_patterns(self, ctx: KmodContext) -> Pairs:
        """CTX's alias_patterns(), the same tuple object while the index is unchanged."""
        key = ctx.index_key("modules.alias.bin")
        with self._lock:
            kept = self._aliases
        if key is not None and kept is not None and kept.key == key:
            return kept.value
        pairs = ctx.alias_patterns()
        if key is not None and ctx.index_key("modules.alias.bin") == key:  # unchanged meanwhile
            with self._lock:
                self._aliases = _Kept(key, pairs)
        return pairs

    def resolutions(self, key: Key | None) -> dict[str, Resolution]:
        """A copy of the kept resolutions when KEY is what they were kept under, else {}."""
        with self._lock:
            kept = self._resolutions
        if key is None or kept is None or kept.key != key:
            return {}
        return dict(kept.value)

    def keep(self, key: Key | None, by_name: dict[str, Resolution]) -> None:
        if key is not None and len(by_name) <= RESOLUTIONS_MAX:
            with self._lock:
                self._resolutions = _Kept(key, by_name)
