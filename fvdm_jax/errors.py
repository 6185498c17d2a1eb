"""The project's one error for what a user can fix: a bad config value or a bad input.

Every check of a config key or an input file raises `ConfigError` with a one-line message that
says what is wrong and how to fix it; `python -m fvdm_jax.main` prints it as one line, while every
other exception keeps its traceback. This module imports nothing, so any module may raise it.
"""

from __future__ import annotations

from collections.abc import Sequence


class ConfigError(ValueError):
    """A config that does not fit configs/default.py (unknown or missing key, wrong type, value
    outside its choices or range). The message is one line: the first problem in full, then how
    many more there are and their keys. `problems` holds every message, `keys` their config paths
    (e.g. 'model.size'). Raised with one message (a str) by the checks of the modules, for any
    bad value or input the user can fix. A ValueError, so `except ValueError` keeps working."""

    def __init__(self, problems: str | Sequence[tuple[str, str]]):
        if isinstance(problems, str):
            problems = [("", problems)]
        self.keys = [key for key, _ in problems]
        self.problems = [message for _, message in problems]
        message = self.problems[0]
        rest = [key for key in self.keys[1:] if key]
        if rest:
            word = "problem" if len(rest) == 1 else "problems"
            message += f" (and {len(rest)} more {word}: {', '.join(rest)})"
        super().__init__(message)
