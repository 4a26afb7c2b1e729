"""User-facing errors: one line naming the problem and a fix; the CLI prints it and exits 2."""

from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """Bad input from the user. ``str(err)`` is the one line the CLI prints (problem, then fix)."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)


def suggest(name: str, choices: Iterable[str], what: str) -> UserError:
    """An 'unknown X' error that names the closest valid choices."""
    options = sorted(set(choices))
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    if close:
        fix = "did you mean " + " or ".join(repr(c) for c in close) + "?"
    else:
        shown = ", ".join(options[:12]) + (", ..." if len(options) > 12 else "")
        fix = f"choose one of: {shown}"
    return UserError(f"unknown {what} {name!r}", fix)


def require(condition: bool, problem: str, fix: str = "") -> None:
    """Raise :class:`UserError` unless ``condition`` holds."""
    if not condition:
        raise UserError(problem, fix)
