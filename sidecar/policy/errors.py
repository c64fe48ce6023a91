"""The one exception a bad policy file raises, carrying every problem found with its position.

    PolicyError(Exception)
      .problems: list[Problem]      # each prints as FILE:LINE:COL: message

Anything the loader meets in a file (unreadable, not YAML, wrong shape, dangling reference) becomes a
Problem; `load_policy` raises nothing else for bad input.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, order=True)
class Problem:
    file: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class PolicyError(Exception):
    def __init__(self, problems: list[Problem]):
        self.problems = sorted(set(problems))
        super().__init__("\n".join(str(p) for p in self.problems))


def suggest(word: str, choices: Iterable[str]) -> str:
    """` (did you mean 'retry'?)` when `word` is close to one of `choices`, else the empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class CertError(Exception):
    """HTTPS interception's CA could not be loaded or made (proxy/certs.py); the message names the
    file, never the key."""
