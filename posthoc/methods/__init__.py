"""Post-training ensembling methods, one module each, registered by name.

Each method is one file named after it (``noisy.py``, ``resample.py``, ``lastlayer.py``, ``sparse.py``,
``supernet.py``) holding its ``Config`` and a ``build(ctx)`` behind :class:`~posthoc.methods.base.Method`;
shared machinery lives apart (``base.py``: the interface; ``registry.py``: names; ``_layerwise.py``:
last-layers retraining; ``_coupling.py``: the SuperNet coupling layer). Importing this package registers
every method; ``posthoc methods`` lists them with their one-line summaries.
"""

from __future__ import annotations

from . import lastlayer, noisy, resample, sparse, supernet  # noqa: F401  (they register themselves)
from .base import BoostContext, Method, MethodConfig
from .registry import get_method, list_methods, register

__all__ = ["BoostContext", "Method", "MethodConfig", "get_method", "list_methods", "register"]
