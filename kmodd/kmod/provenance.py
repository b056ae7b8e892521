"""Where a modprobe.d line comes from: the file:line libkmod applies but cannot tell.

A small reader of the modprobe.d dirs that follows kmod 30's rules exactly
(libkmod/libkmod-config.c, shared/util.c):

- a config path that is a directory contributes its entries ending in `.conf` (kmod 30
  also reads `.alias`, kmod 34 does not: probed on the loaded libkmod), never dotfiles,
  never subdirectories; a path that is a file counts under its basename; all files go
  into ONE list sorted by strcmp of the basename, and the first path holding a basename
  wins (a later one is ignored);
- a symlink to /dev/null reads as empty: it masks the same basename further down;
- `modules.softdep` of the module dir joins the list under that basename;
- lines: backslash-newline joins (the next line's indentation is kept), any other
  backslash keeps only the next character (one ending the file adds byte 0xff in kmod 30,
  nothing in kmod 34: probed on the loaded libkmod); a line is a comment only if its first byte
  is `#` (an indented `#` is a bad line kmod ignores); tokens split on space and tab;
- names go through kmod's `underscores()`: '-' -> '_' outside [...], a stray ']' or an
  unclosed '[' rejects the line; options/install/remove/softdep keep the rest of the
  line verbatim after exactly one separator (tabs in options become spaces);
- matching: alias patterns fnmatch the normalized name; install/remove/softdep apply to
  a module by fnmatch, first line wins; options apply by exact module name or by the
  alias the module was found through, and accumulate; blacklist is by exact name.

The kernel command line (`MOD.PARAM=` options, `modprobe.blacklist=`) is applied by
libkmod after all files; given one (`kernel_cmdline=`, `from_paths` reads the host's
/proc/cmdline, which is what libkmod reads even under --root), its entries follow the
file lines as `/proc/cmdline:1` (kmodd.kmod.kcmdline).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from kmodd.kmod import libkmod
from kmodd.kmod.kcmdline import cmdline_lines, read_host_cmdline
from kmodd.kmod.libkmod import fnmatch
from kmodd.kmod.model import ConfigLine
from kmodd.kmod.names import underscores
from kmodd.paths import Paths

DIRECTIVES = ("alias", "blacklist", "options", "install", "remove", "softdep")
# Bound what we read: modprobe.d is trusted-ish admin input, but a runaway file must not
# stall explain or the daemon.  Real files are a few KiB.
MAX_FILE_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line kmod ignores with "ignoring bad line" (or an unreadable/skipped entry)."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def config_files(
    config_paths: Sequence[str | Path], module_dir: str | Path | None = None
) -> tuple[Path, ...]:
    """The files kmod parses, in its order (strcmp of basenames, first path wins)."""
    chosen: dict[bytes, Path] = {}
    if module_dir is not None:
        chosen[b"modules.softdep"] = Path(module_dir) / "modules.softdep"
    for entry in config_paths:
        for name, path in _entries(Path(entry)):
            chosen.setdefault(os.fsencode(name), path)
    return tuple(chosen[key] for key in sorted(chosen))


def _entries(path: Path) -> Iterator[tuple[str, Path]]:
    try:
        st = path.stat()
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode):
        yield path.name, path
        return
    try:
        names = [entry.name for entry in path.iterdir()]
    except OSError:
        return
    suffixes = (".conf", ".alias") if libkmod.reads_dot_alias_files() else (".conf",)
    for name in names:
        if name.startswith(".") or not name.endswith(suffixes):
            continue
        if len(name) < 6 or (path / name).is_dir():
            continue
        yield name, path / name


def logical_lines(data: str, *, eof_byte: bool = True) -> Iterator[tuple[int, str]]:
    """(first physical line number, joined text), as kmod's freadline_wrapped joins.
    EOF_BYTE: a backslash ending the file adds byte 0xff (kmod 30) or nothing (kmod 34);
    libkmod.stores_eof_after_backslash() says which the loaded libkmod does."""
    buf: list[str] = []
    lineno = 1
    first = 1
    i = 0
    while i < len(data):
        ch = data[i]
        if ch == "\n":
            yield first, "".join(buf)
            buf = []
            lineno += 1
            first = lineno
        elif ch == "\\":
            i += 1
            if i < len(data):
                if data[i] == "\n":
                    lineno += 1
                else:
                    buf.append(data[i])
            elif eof_byte:  # a dangling backslash at EOF: kmod 30 stores getc()'s EOF
                buf.append("\udcff")  # (-1) as 0xff (os.fsdecode's spelling of byte 0xff)
        else:
            buf.append(ch)
        i += 1
    if buf:
        yield first, "".join(buf)


def _split_first(text: str) -> tuple[str | None, str]:
    """strtok_r(.., "\\t ") once: (token or None, rest after one separator)."""
    stripped = text.lstrip(" \t")
    if not stripped:
        return None, ""
    end = next((i for i, c in enumerate(stripped) if c in " \t"), len(stripped))
    return stripped[:end], stripped[end + 1 :]


def parse_line(path: str, lineno: int, text: str) -> ConfigLine | BadLine | None:
    """One logical line: a ConfigLine, a BadLine kmod would log, or None (blank/comment)."""
    if not text or text[0] == "#":
        return None
    cmd, rest = _split_first(text)
    if cmd is None:
        return None
    if cmd not in DIRECTIVES:
        if cmd in ("include", "config"):
            return BadLine(path, lineno, f"command {cmd} is deprecated and not parsed anymore")
        return BadLine(path, lineno, f"ignoring bad line starting with '{cmd}'")
    name, rest = _split_first(rest)
    target = None if name is None else underscores(name)
    value: str | None
    if cmd == "alias":
        module, _ = _split_first(rest)
        value = None if module is None else underscores(module)
    elif cmd == "blacklist":
        value = ""
    else:
        value = rest or None  # strtok_r(NULL, "\0") is NULL on an empty rest
        if cmd == "options" and value is not None:
            value = value.replace("\t", " ")
    if target is None or value is None:
        return BadLine(path, lineno, f"ignoring bad line starting with '{cmd}'")
    return ConfigLine(path=path, line=lineno, directive=cmd, target=target, text=text, value=value)


def read_file(path: Path) -> tuple[list[ConfigLine], list[BadLine]]:
    lines: list[ConfigLine] = []
    bad: list[BadLine] = []
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        return lines, [BadLine(str(path), 0, f"cannot read: {err.strerror}")]
    if len(data) > MAX_FILE_BYTES:
        return lines, [BadLine(str(path), 0, f"larger than {MAX_FILE_BYTES} bytes: not read")]
    eof_byte = libkmod.stores_eof_after_backslash()
    for lineno, text in logical_lines(os.fsdecode(data), eof_byte=eof_byte):
        # kmod parses each line as a C string: whatever follows a NUL byte is not there.
        parsed = parse_line(str(path), lineno, text.partition("\0")[0])
        if isinstance(parsed, ConfigLine):
            lines.append(parsed)
        elif isinstance(parsed, BadLine):
            bad.append(parsed)
    return lines, bad


class Provenance:
    """Every modprobe.d line in kmod's parse order, with file:line, and kmod's matching."""

    def __init__(
        self,
        config_paths: Sequence[str | Path],
        module_dir: str | Path | None = None,
        *,
        kernel_cmdline: str | None = None,
    ) -> None:
        self.files = config_files(config_paths, module_dir)
        lines: list[ConfigLine] = []
        bad: list[BadLine] = []
        for path in self.files:
            file_lines, file_bad = read_file(path)
            lines.extend(file_lines)
            bad.extend(file_bad)
        if kernel_cmdline is not None:
            lines.extend(cmdline_lines(kernel_cmdline))
        self.lines: tuple[ConfigLine, ...] = tuple(lines)
        self.bad_lines: tuple[BadLine, ...] = tuple(bad)

    @classmethod
    def from_paths(cls, paths: Paths, *, kernel_cmdline: bool = True) -> Provenance:
        """The root's modprobe.d dirs and modules.softdep, plus (by default) the host's
        /proc/cmdline, exactly the inputs libkmod combines for that root."""
        cmdline = read_host_cmdline() if kernel_cmdline else None
        return cls(paths.modprobe_d_dirs, paths.module_dir, kernel_cmdline=cmdline)

    def of(self, directive: str) -> tuple[ConfigLine, ...]:
        return tuple(line for line in self.lines if line.directive == directive)

    # --- what kmod would apply ---------------------------------------------------

    def install_line(self, module: str) -> ConfigLine | None:
        """The install line kmod runs for MODULE: the first whose pattern fnmatches."""
        return self._first("install", module)

    def remove_line(self, module: str) -> ConfigLine | None:
        return self._first("remove", module)

    def softdep_line(self, module: str) -> ConfigLine | None:
        """The only softdep line kmod uses for MODULE (the first that fnmatches)."""
        return self._first("softdep", module)

    def _first(self, directive: str, module: str) -> ConfigLine | None:
        name = underscores(module) or module
        return next(
            (ln for ln in self.lines if ln.directive == directive and fnmatch(ln.target, name)),
            None,
        )

    def aliases_onto(self, module: str) -> tuple[ConfigLine, ...]:
        """Alias lines whose target is MODULE (any name they match maps onto it)."""
        name = underscores(module) or module
        return tuple(ln for ln in self.of("alias") if ln.value == name)

    def aliases_matching(self, request: str) -> tuple[ConfigLine, ...]:
        """Alias lines whose pattern matches REQUEST, in the order kmod returns them."""
        name = underscores(request)
        if name is None:
            return ()
        return tuple(ln for ln in self.of("alias") if fnmatch(ln.target, name))

    def is_blacklisted(self, module: str) -> bool:
        name = underscores(module) or module
        return any(ln.target == name for ln in self.of("blacklist"))

    # --- explain ---------------------------------------------------------------------

    def for_module(self, module: str) -> tuple[ConfigLine, ...]:
        """Lines relevant to MODULE, in parse order: aliases onto it, its blacklist and
        options lines, and the install/remove/softdep lines kmod would pick for it."""
        name = underscores(module) or module
        picked = {self.install_line(name), self.remove_line(name), self.softdep_line(name)}
        return tuple(
            ln
            for ln in self.lines
            if ln in picked
            or (ln.directive == "alias" and ln.value == name)
            or (ln.directive in ("blacklist", "options") and ln.target == name)
        )

    def for_request(self, request: str, modules: Sequence[str] = ()) -> tuple[ConfigLine, ...]:
        """Lines relevant to REQUEST and the modules it resolved to: matching aliases,
        an install/remove line named exactly REQUEST (kmod's lookup stage), options
        given to the request or a matching alias pattern, and for_module of each."""
        name = underscores(request)
        matching = self.aliases_matching(request)
        patterns = {ln.target for ln in matching} | ({name} if name else set())
        relevant: set[ConfigLine] = set(matching)
        for ln in self.lines:
            by_name = ln.directive in ("install", "remove") and ln.target == name
            if by_name or (ln.directive == "options" and ln.target in patterns):
                relevant.add(ln)
        for module in modules:
            relevant.update(self.for_module(module))
        return tuple(ln for ln in self.lines if ln in relevant)
