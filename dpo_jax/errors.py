"""Expected failures: each message says what is wrong and where (key, file, row, step).

``train.py`` and ``generate.py`` print a ``DpoError`` (and an ``OSError``, which names its path)
as one line and exit non-zero; anything else is a bug and keeps its traceback. The subclasses
are also ``ValueError`` / ``FloatingPointError`` where callers catch those.
"""

from __future__ import annotations


class DpoError(Exception):
    """An expected failure whose message is complete without a traceback."""


class ConfigError(DpoError, ValueError):
    """A config key with a value that cannot run; the message names the key."""


class NonFiniteError(DpoError, FloatingPointError):
    """A non-finite loss or gradient; the message names the step and the last good checkpoint."""


class Stopped(DpoError):
    """The run was stopped on purpose (SIGTERM, Ctrl-C) after its work was made safe."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def choice(key: str, value, valid) -> None:
    """Raises ConfigError unless ``value`` is one of ``valid``."""
    if value not in valid:
        raise ConfigError(f"config key {key}={value!r}: valid values are "
                          f"{', '.join(map(repr, valid))}")


def at_least(key: str, value, low, why: str = "") -> None:
    """Raises ConfigError unless ``value`` is a number >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
        raise ConfigError(f"config key {key}={value!r}: must be >= {low}"
                          f"{' (' + why + ')' if why else ''}")
