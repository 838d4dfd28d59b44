"""The family registry: every servable family by name, and how to load its models.

A family module registers a loader, ``load(settings) -> [ServedFamily, ...]`` (one entry
per model it serves: SeqTR serves one per task); ``Settings.families`` names the ones a
server loads, in order, so any family can be switched off, ARM included.  Tests and
embedders can skip the registry and hand ``create_app`` ready-made families.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.config import Settings
    from service.family import ServedFamily

Loader = Callable[["Settings"], list["ServedFamily"]]

LOADERS: dict[str, Loader] = {}


def register(name: str) -> Callable[[Loader], Loader]:
    """Decorator: ``@register("pssnet")`` over the family's loader."""
    def add(loader: Loader) -> Loader:
        if name in LOADERS and LOADERS[name] is not loader:
            raise ValueError(f"a family named {name!r} is registered already")
        LOADERS[name] = loader
        return loader
    return add


def load(settings: Settings) -> list[ServedFamily]:
    """The models of every family ``settings.families`` names, in that order."""
    import service.families  # noqa: F401  (registers the built-in families)

    unknown = [n for n in settings.families if n not in LOADERS]
    if unknown:
        raise ValueError(f"unknown families in the families setting: {', '.join(unknown)} "
                         f"(registered: {', '.join(LOADERS)})")
    return [model for name in settings.families for model in LOADERS[name](settings)]
