"""posthoc: post-training ensembles for timm and Hugging Face Hub image classifiers.

Typical use::

    import posthoc
    model = posthoc.load_model("resnet50.a1_in1k")       # any timm / Hub / local checkpoint
    ens = posthoc.load("runs/r50-noisy")                 # an exported ensemble artifact
    probs = ens(images)                                  # (B, C) class probabilities
"""

__version__ = "0.2.0"

from .artifact import save
from .ensemble import Combine, Ensemble, MemberGroup, Provenance
from .errors import PosthocError
from .sources import load_artifact as load
from .sources import load_model

__all__ = ["Combine", "Ensemble", "MemberGroup", "PosthocError", "Provenance", "__version__", "load", "load_model", "save"]
