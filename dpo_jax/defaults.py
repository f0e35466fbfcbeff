"""The project's config defaults, read from ``configs/default.py`` (the one place they live).

Library dataclasses that mirror config keys (``data.DataConfig``, ``losses.LossConfig``) take
their defaults from here instead of repeating them.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def config():
    """``configs/default.py``'s ``get_config()`` (cached; treat it as read-only)."""
    from configs import default
    return default.get_config()


def get(key: str):
    return config()[key]
