"""posthoc: post-training ensembles for timm and Hugging Face Hub image classifiers.

Typical use::

    import posthoc
    model = posthoc.load_model("resnet50.a1_in1k")       # any timm / Hub / local checkpoint
    ens = posthoc.load("runs/r50-noisy")                 # an exported ensemble artifact
    probs = ens(images)                                  # (B, C) class probabilities
"""

__version__ = "0.1.0"

from .errors import PosthocError  # noqa: E402
from .sources import load_model  # noqa: E402

__all__ = ["PosthocError", "load_model", "__version__"]
