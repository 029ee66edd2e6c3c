"""The one error type of a bad configuration, and the check every validate() uses."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A user-facing configuration problem; the message is one line."""


def _require(ok: bool, field_name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}={value!r} is invalid: {allowed}")
