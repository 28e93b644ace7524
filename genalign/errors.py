"""The config error, in a leaf module: :mod:`genalign.config` re-exports it and :mod:`genalign.method_specs`
(which config consults) raises it, so neither of the two imports the other for it."""

from __future__ import annotations

from typing import Any, Sequence


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the key."""


def check_choice(key: str, value: Any, valid: Sequence[Any]) -> None:
    """``ConfigError`` naming ``key`` and the valid values when ``value`` is not one of them."""
    if value not in valid:
        raise ConfigError(f"{key} = {value!r} is not valid; choose one of {list(valid)}")


__all__ = ["ConfigError", "check_choice"]
