"""Post-training ensembling methods, one module each, registered by name.

Each method is one file named after it (``noisy.py``, ``resample.py``, ``lastlayer.py``, ``supernet.py``,
...) holding its ``Config`` and a ``build(ctx)`` behind :class:`~posthoc.methods.base.Method`; shared
machinery lives apart (``base.py``: the interface and declared options; ``_layerwise.py``: last-layers
retraining). ``posthoc methods`` lists them with their one-line summaries. A method's model-card text is
the title and first paragraph of its module docstring.
"""

from __future__ import annotations

import inspect

from ..card import register_method_text
from ..errors import PosthocError
from .base import BoostContext, Method, MethodConfig, make_config, option

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available to ``posthoc boost --method NAME``."""
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


from . import lastlayer, noisy, resample, sparse, supernet  # noqa: E402,F401  (they register themselves)

__all__ = ["BoostContext", "Method", "MethodConfig", "get_method", "list_methods", "make_config", "option", "register"]
