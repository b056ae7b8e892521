"""Typed errors.  Library code raises these; only entry points turn them into exit codes."""

from __future__ import annotations

from dataclasses import dataclass


class KmoddError(Exception):
    """Base of every error kmodd reports to a user: a message and an optional hint."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message}\n  hint: {self.hint}"


@dataclass(frozen=True, slots=True)
class Issue:
    """One located problem in an input file: FILE:LINE:COL: message (hint)."""

    path: str
    line: int  # 1-based; 0 when the whole file is meant
    column: int  # 1-based; 0 when the whole line is meant
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        where = self.path
        if self.line:
            where += f":{self.line}"
            if self.column:
                where += f":{self.column}"
        text = f"{where}: {self.message}"
        return text if self.hint is None else f"{text} (hint: {self.hint})"


class InvalidInputError(KmoddError):
    """A set of located problems; nothing was applied."""

    def __init__(self, issues: list[Issue], *, what: str = "input") -> None:
        self.issues = tuple(issues)
        super().__init__(f"{len(self.issues)} problem(s) in {what}")

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)
