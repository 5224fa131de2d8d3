"""One registry type for everything a recipe or a flag names: stages, formats, launchers,
evaluation targets.

Entries are either objects or lazy ``"module:attribute"`` strings, so a name can be
validated (and a did-you-mean offered) without importing its implementation — validating a
recipe must not import torch. Registering a name twice is an error, not a silent override.

lm-eval's ``Registry`` has the same shape; ours is a few lines because it needs no
decorators, aliases or metadata, and it raises the project's own user error.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from optimizer.errors import OptimizerError

T = TypeVar("T")


class UnknownName(OptimizerError, KeyError):
    """A name that is not in the registry (exit 2, with a did-you-mean)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """``"; did you mean 'x'?"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


class Registry(Generic[T]):
    """Names to objects of one kind (``kind`` is used in messages: "stage type", "format").

    ``loader`` turns a lazy entry's imported attribute into the registered object (default:
    the attribute itself); ``discover`` adds entries on first use (e.g. the modules of a
    package), so that adding an implementation needs no edit of a central list.
    """

    def __init__(
        self,
        kind: str,
        entries: Mapping[str, T | str] | None = None,
        *,
        discover: Callable[[], Mapping[str, T | str]] | None = None,
        loader: Callable[[str, object], T] | None = None,
    ):
        self.kind = kind
        self._entries: dict[str, T | str] = {}
        self._loaded: dict[str, T] = {}
        self._discover = discover
        self._loader = loader
        for name, target in (entries or {}).items():
            self.add(name, target)

    def _ensure(self) -> None:
        if self._discover is not None:
            discover, self._discover = self._discover, None
            for name, target in discover().items():
                self.add(name, target)

    def add(self, name: str, target: T | str) -> None:
        """Register ``target`` (an object, or ``"module:attribute"``) under ``name``."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = target

    def names(self) -> list[str]:
        self._ensure()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._ensure()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def unknown(self, name: str) -> str:
        """The message for a name that is not registered."""
        return (
            f"unknown {self.kind} '{name}'{did_you_mean(name, self.names())} "
            f"(known: {', '.join(self.names())})"
        )

    def get(self, name: str) -> T:
        """The object registered as ``name``, imported on first use; :class:`UnknownName` if
        there is none."""
        self._ensure()
        if name in self._loaded:
            return self._loaded[name]
        if name not in self._entries:
            raise UnknownName(self.unknown(name))
        target = self._entries[name]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            obj: object = importlib.import_module(module)
            for part in attr.split(".") if attr else ():
                obj = getattr(obj, part)
            value = self._loader(name, obj) if self._loader else obj  # type: ignore[assignment]
        else:
            value = target
        self._loaded[name] = value  # type: ignore[assignment]
        return value  # type: ignore[return-value]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def items(self) -> list[tuple[str, T]]:
        """Every entry, loaded (imports every lazy entry)."""
        return [(n, self.get(n)) for n in self.names()]
