"""Exceptions raised by bon-sr. Each message names the problem and the fix."""

from __future__ import annotations


class BonSRError(Exception):
    """Base class for every error bon-sr raises on purpose."""


class ConfigError(BonSRError, ValueError):
    """An option has a value that cannot work (the message says what to change)."""


class InputError(BonSRError, ValueError):
    """A prompt file or prompt is malformed (the message names file and line)."""


class ModelError(BonSRError):
    """A model cannot be found, fetched, converted or loaded."""


class MissingExtraError(BonSRError, ImportError):
    """An optional dependency is missing; the message names the pip extra."""

    def __init__(self, package: str, extra: str, purpose: str = ""):
        what = f" (needed for {purpose})" if purpose else ""
        super().__init__(
            f"The optional package '{package}' is not installed{what}. "
            f"Install it with: pip install 'bon-sr[{extra}]'"
        )
        self.package = package
        self.extra = extra
