"""The method registry: ``posthoc boost --method NAME`` looks methods up here.

Each method module registers its class with :func:`register` when it is imported; the package's
``__init__`` imports every method module (as timm's ``timm.models`` imports its model files, which
register with ``timm.models._registry``), so this module imports no method and no method imports the
package.
"""

from __future__ import annotations

import inspect

from ..card import register_method_text
from ..errors import PosthocError
from .base import Method

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available to ``posthoc boost --method NAME``; its model-card text is
    the title and first paragraph of its module docstring."""
    _REGISTRY[cls.name] = cls
    title, _, body = (inspect.getmodule(cls).__doc__ or cls.summary).strip().partition("\n\n")
    first = body.split("\n\n")[0]
    text = " ".join(f"{title.split(': ', 1)[-1]} {first}".split()).replace("``", "`")
    register_method_text(cls.name, text[:1].upper() + text[1:])
    return cls


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PosthocError(f"unknown method '{name}'; available: {', '.join(sorted(_REGISTRY))}") from None


def list_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)
