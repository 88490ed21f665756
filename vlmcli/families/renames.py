"""Checkpoint tensor names -> our parameter names, as ordered regex rules.

Checkpoints of one family name the same tensor several ways (the hub repos of one
transformers version, the in-memory names of another); a family lists its rules once and
every command maps names through them."""

from __future__ import annotations

import re


class Renames:
    """(pattern, replacement) pairs applied in order, first match wins; a key no rule
    matches is not used (reported as unused by the loader)."""

    def __init__(self, *rules: tuple[str, str]):
        self.rules = tuple((re.compile(p), r) for p, r in rules)

    def __call__(self, key: str) -> str | None:
        for pattern, repl in self.rules:
            new, n = pattern.subn(repl, key, count=1)
            if n:
                return new
        return None


def prefixes(*names: str):
    """A keep_dense predicate: our Linear module names under any of these prefixes."""
    return lambda module: module.startswith(names)
