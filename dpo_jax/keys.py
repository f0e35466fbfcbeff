"""A config key as a dataclass field: its default, its one-line meaning, its check and whether
a resume must match it (``key``), and the checks the groups share."""

from __future__ import annotations

import dataclasses
import re

from dpo_jax.errors import ConfigError, at_least, choice


_SAME = object()


def key(default, doc: str, check=None, *, resume: bool = False, cli=_SAME):
    """A field of a config group. ``check(name, value)`` raises ConfigError naming the key;
    ``resume``: a resume must keep its value (``workdir.check_resume``); ``cli``: the default as
    a config file spells it, where the group holds it parsed (``"sigmoid,sft"`` for a tuple)."""
    meta = {"doc": doc, "check": check, "resume": resume,
            "cli": default if cli is _SAME else cli}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def fields(group) -> list[dataclasses.Field]:
    """The keys of a group (class or instance), in order."""
    return [f for f in dataclasses.fields(group) if "doc" in f.metadata]


def cli_default(f: dataclasses.Field):
    """A key's default as a config file spells it."""
    return f.metadata["cli"]


def check_fields(group):
    """Every key's own check, on an instance."""
    for f in fields(group):
        if f.metadata["check"] is not None:
            f.metadata["check"](f.name, getattr(group, f.name))


# ---------------------------------------------------------------------------- shared checks

def text(name, v):
    if not isinstance(v, str):
        raise ConfigError(f"config key {name}={v!r}: must be a string")


def nonempty(name, v):
    text(name, v)
    if not v.strip():
        raise ConfigError(f"config key {name} is empty")


def flag(name, v):
    if not isinstance(v, bool):
        raise ConfigError(f"config key {name}={v!r}: must be True or False")


def integer(low=None, why=""):
    def check(name, v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"config key {name}={v!r}: must be an integer")
        if low is not None:
            at_least(name, v, low, why)
    return check


def number(low=None, high=None, *, open_low=False, open_high=False):
    def check(name, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise ConfigError(f"config key {name}={v!r}: must be a number")
        bad_low = low is not None and (v <= low if open_low else v < low)
        bad_high = high is not None and (v >= high if open_high else v > high)
        if bad_low or bad_high:
            lo = "" if low is None else f"{'(' if open_low else '['}{low}, "
            hi = "inf)" if high is None else f"{high}{')' if open_high else ']'}"
            raise ConfigError(f"config key {name}={v!r}: must lie in {lo or '(-inf, '}{hi}")
    return check


def one_of(*valid):
    return lambda name, v: choice(name, v, valid)


def regex(name, v):
    text(name, v)
    try:
        re.compile(v)
    except re.error as e:
        raise ConfigError(f"config key {name}={v!r}: not a regular expression ({e})") from None


def mesh_axis(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or not (v == -1 or v >= 1):
        raise ConfigError(f"config key {name}={v!r}: must be -1 (the devices left over) or >= 1")
