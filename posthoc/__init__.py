"""posthoc: post-training ensembles for timm and Hugging Face Hub image classifiers.

Typical use::

    import posthoc
    model = posthoc.load_model("resnet50.a1_in1k")       # any timm / Hub / local checkpoint
    ens = posthoc.load("runs/r50-noisy")                 # an exported ensemble artifact
    probs = ens(images)                                  # (B, C) class probabilities
"""

__version__ = "0.1.0"

from .artifact import load, save  # noqa: E402
from .ensemble import Combine, Ensemble, MemberGroup  # noqa: E402
from .errors import PosthocError  # noqa: E402
from .sources import load_model  # noqa: E402

__all__ = ["Combine", "Ensemble", "MemberGroup", "PosthocError", "load", "load_model", "save", "__version__"]
