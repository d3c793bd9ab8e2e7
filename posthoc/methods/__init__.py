"""Post-training ensembling methods, one module each, registered by name.

========== ============================================================================== ==========
name       what it does                                                                    module
========== ============================================================================== ==========
noisy      sparse Gaussian mutations at a target KL, top-K by validation (no training)    noisy.py
lastlayer  retrain the classifier, then earlier blocks one at a time (one network)        lastlayer.py
supernet   one trained linear layer over members' concatenated features (SuperNet)        supernet.py
resample   ~1 epoch constant-rate SGD, Welford mean/std per weight: mean model or draws   resample.py
========== ============================================================================== ==========
"""

from __future__ import annotations

from ..errors import PosthocError
from .base import BoostContext, Method, MethodConfig, make_config, option

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available to ``posthoc boost --method NAME``."""
    _REGISTRY[cls.name] = cls
    from ..card import register_method_text

    register_method_text(cls.name, cls.card_text or cls.summary)
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


from . import noisy  # noqa: E402,F401  (registers itself)
from . import lastlayer, supernet  # noqa: E402,F401  (register themselves)
from . import resample  # noqa: E402,F401  (registers itself)

__all__ = ["BoostContext", "Method", "MethodConfig", "get_method", "list_methods", "make_config", "option", "register"]
