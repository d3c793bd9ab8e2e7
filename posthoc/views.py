"""Test-time views: deterministic transforms of the input batch whose predictions an artifact averages.

A view is a function of a preprocessed batch (B, C, H, W) that keeps its shape. :data:`VIEWS` is the one
place they are defined; an artifact's combine rule stores the names of its views in order, always
starting with ``identity``, and the fused module runs them as one batch (V*B) through the network
(:func:`stack_views`). ``--tta`` names the sets a user picks from (:data:`TTA_SETS`); ``auto`` chooses
between them on the select part (:mod:`posthoc.calibration`).

Only the horizontal mirror is offered: it is the view practitioners try first (an image and its mirror
show the same class for most natural-image datasets), and the one measured to help (shifts and second
crop scales can be added here once a select part shows them useful). Datasets whose classes are not
mirror-symmetric (digits, text) must end with ``identity`` alone, which ``auto`` decides from the data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .errors import PosthocError

VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "hflip": lambda x: x.flip(-1),  # the mirror image: width is the last dimension
}
TTA_SETS: dict[str, tuple[str, ...]] = {"none": ("identity",), "flip": ("identity", "hflip")}
IDENTITY = TTA_SETS["none"]


def check_views(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple, checked: known views, no repeats, ``identity`` first."""
    names = tuple(names)
    unknown = [n for n in names if n not in VIEWS]
    if unknown or not names or names[0] != "identity" or len(set(names)) != len(names):
        raise PosthocError(
            f"test-time views must be 'identity' followed by distinct known views ({', '.join(VIEWS)}), got {list(names)}"
        )
    return names


def views_of(tta: str) -> tuple[str, ...]:
    """The views a ``--tta`` choice stands for (``none`` or ``flip``; ``auto`` is decided on data)."""
    try:
        return TTA_SETS[tta]
    except KeyError:
        raise PosthocError(f"--tta must be one of {', '.join(TTA_SETS)} here, got '{tta}'") from None


def stack_views(x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """The batch under every view, stacked view after view: (V*B, ...)."""
    if len(names) == 1:
        return VIEWS[names[0]](x)
    return torch.cat([VIEWS[n](x) for n in names])


def describe(names: Sequence[str]) -> str:
    """``identity + hflip (2 passes per image)``: how ``info`` and the model card show views."""
    return " + ".join(names) + f" ({len(names)} pass{'es' if len(names) > 1 else ''} per image)"
