"""Small named registries, one per axis of variation (attention kind, norm, positional, ...)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(name), choices, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


class Registry(Generic[T]):
    """Maps a config string to an implementation; unknown names list the valid ones."""

    def __init__(self, axis: str):
        self.axis = axis
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.axis} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def names(self, sort: bool = True) -> list[str]:
        """The registered names, sorted (or in registration order: the default kind first)."""
        return sorted(self._items) if sort else list(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def get(self, name: str, field: str | None = None) -> T:
        if name not in self._items:
            where = f" (config field {field})" if field else ""
            raise ConfigError(
                f"unknown {self.axis} {name!r}{where}; valid choices: {', '.join(self.names())}."
                + did_you_mean(name, self.names())
            )
        return self._items[name]
