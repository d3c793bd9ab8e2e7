"""posthoc: post-training ensembles for timm and Hugging Face Hub image classifiers.

Typical use::

    import posthoc
    model = posthoc.load_model("resnet50.a1_in1k")       # any timm / Hub / local checkpoint
    ens = posthoc.load("runs/r50-noisy")                 # an exported ensemble artifact
    probs = ens(images)                                  # (B, C) class probabilities

The names below are imported on first use, so ``posthoc --version`` and ``--help`` start without
importing torch or timm.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_PUBLIC = {
    "Combine": ("ensemble", "Combine"),
    "Ensemble": ("ensemble", "Ensemble"),
    "MemberGroup": ("ensemble", "MemberGroup"),
    "Provenance": ("ensemble", "Provenance"),
    "PosthocError": ("errors", "PosthocError"),
    "load": ("sources", "load_artifact"),
    "load_model": ("sources", "load_model"),
    "save": ("artifact", "save"),
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        module, attr = _PUBLIC[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'posthoc' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)
