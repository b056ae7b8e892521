"""What libkmod takes from the kernel command line, with provenance.

libkmod (kmod 30, `kmod_config_parse_kcmdline`) reads the HOST's /proc/cmdline whatever
the module directory or config paths, after all modprobe.d files: `MOD.PARAM[=VAL]`
becomes `options MOD PARAM[=VAL]`, `modprobe.blacklist=A,B` becomes `blacklist A` and
`blacklist B`.  This is a port of its small state machine, quirks included (each pinned
by the fake-cmdline oracle test):

- only a token's first character may be a quote; a quote elsewhere outside the value
  drops the token; whitespace inside quotes is allowed only in the value;
- grub's `"mod.p=a b"` is re-quoted to `mod.p="a b"`;
- a second `.` in the parameter, or `=` before any `.`, drops the token;
- blacklist names are NOT normalized (`modprobe.blacklist=crc32c-intel` never matches
  the module crc32c_intel) and empty entries are kept; option module names are
  normalized and a bad one (unbalanced brackets) is ignored.
"""

from __future__ import annotations

from pathlib import Path

from kmodd.kmod.model import ConfigLine
from kmodd.kmod.names import underscores

CMDLINE = "/proc/cmdline"
KCMD_LINE_SIZE = 4096  # libkmod reads at most this many bytes (minus the NUL)
_SPACES = " \n\t\v\f\r"


def read_host_cmdline(path: str = CMDLINE) -> str:
    """The command line libkmod reads (always the host's, never under --root)."""
    try:
        with Path(path).open("rb") as handle:
            return handle.read(KCMD_LINE_SIZE - 1).decode("utf-8", "surrogateescape")
    except OSError:
        return ""


def _cstr(buf: list[str], start: int) -> str:
    end = buf.index("\0", start)
    return "".join(buf[start:end])


class _Scanner:
    """kmod_config_parse_kcmdline's state machine over a mutable buffer (indexes stand in
    for its pointers; writes of NUL and the grub re-quoting happen in place, as in C)."""

    def __init__(self, text: str) -> None:
        self.buf = [*text[: KCMD_LINE_SIZE - 1].split("\0", 1)[0], "\0"]
        self.state, self.quoted = "modname", False
        self.modname, self.param, self.value, self.quote_start = 0, -1, -1, -1
        self.found: list[tuple[str, str, str | None]] = []

    def run(self) -> list[tuple[str, str, str | None]]:
        for p, ch in enumerate(list(self.buf)):
            if ch == '"':
                self._quote(p)
            elif ch == "\0" or ch in _SPACES:
                self._space(p)
            elif ch == ".":
                self._dot(p)
            elif ch == "=":
                self._equal(p)
            if self.state == "complete":
                self._complete(p)
            if ch == "\0":
                break
        return self.found

    def _quote(self, p: int) -> None:
        self.quoted = not self.quoted
        if self.quoted and self.state == "modname" and p == self.modname:
            self.quote_start, self.modname = p, p + 1
        elif self.state != "value":
            self.state = "ignore"  # a quote anywhere else spoils the token

    def _space(self, p: int) -> None:
        if self.quoted and self.state == "value":
            return
        if self.quoted:
            self.state = "ignore"  # spaces are only allowed in a quoted value
        elif self.state in ("value", "param"):
            self.buf[p] = "\0"
            self.state = "complete"
        else:
            self.modname, self.state, self.quote_start = p + 1, "modname", -1

    def _dot(self, p: int) -> None:
        if self.state == "modname":
            self.buf[p] = "\0"
            self.param, self.state = p + 1, "param"
        elif self.state == "param":
            self.state = "ignore"

    def _equal(self, p: int) -> None:
        if self.state == "param":
            self.value, self.state = p + 1, "value"
        elif self.state == "modname":
            self.state = "ignore"

    def _complete(self, p: int) -> None:
        buf = self.buf
        if 0 <= self.quote_start < self.modname:
            # grub passed "mod.p=a b": shift left over the quote, re-quote the value
            length = self.value - self.modname
            buf[self.quote_start : self.quote_start + length] = buf[self.modname : self.value]
            self.value, self.modname, self.param = self.value - 1, self.modname - 1, self.param - 1
            buf[self.value] = '"'
        value = None if self.value < 0 else _cstr(buf, self.value)
        self.found.append((_cstr(buf, self.modname), _cstr(buf, self.param), value))
        # like kmod, `value` is not reset: it is only read after a fresh '='
        self.modname, self.state, self.quote_start = p + 1, "modname", -1


def cmdline_lines(text: str, *, path: str = CMDLINE) -> tuple[ConfigLine, ...]:
    """The options and blacklist entries libkmod derives from a command line."""
    lines: list[ConfigLine] = []
    for modname, param, value in _Scanner(text).run():
        token = f"{modname}.{param}"
        if modname == "modprobe" and param.startswith("blacklist="):
            for name in (value or "").split(","):
                lines.append(ConfigLine(path, 1, "blacklist", name, token, ""))
            continue
        normalized = underscores(modname)
        if normalized is not None:
            lines.append(
                ConfigLine(path, 1, "options", normalized, token, param.replace("\t", " "))
            )
    return tuple(lines)
