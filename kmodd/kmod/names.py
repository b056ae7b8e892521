"""kmod's name normalization (shared/util.c), shared by the modprobe.d and cmdline readers."""

from __future__ import annotations


def underscores(text: str) -> str | None:
    """kmod's underscores(): '-' -> '_' outside brackets; None when brackets are broken
    (a ']' without '[' or an unclosed '['), which makes kmod reject the line."""
    out = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "]":
            return None
        if ch == "[":
            end = text.find("]", i)
            if end < 0:
                return None
            out.append(text[i : end + 1])
            i = end + 1
            continue
        out.append("_" if ch == "-" else ch)
        i += 1
    return "".join(out)
