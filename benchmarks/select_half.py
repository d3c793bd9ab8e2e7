"""The sweeps' scoring half: methods tune on the first 1,000 images of ``val:select`` and are scored on the
other 1,000, so a sweep chooses defaults without reading the report part (benchmarks/PROTOCOL.md)."""

from __future__ import annotations

from pathlib import Path


def inner_holdout(data: Path, transform, first: int = 1000):
    """The part of ``val:select`` after its first ``first`` images (same shuffled order as the split): with
    CIFAR-10's 2,000-image select part and the default, its second half."""
    from torch.utils.data import Subset

    from posthoc.data import open_split

    full = open_split(data, "val:select", transform)
    first = set(open_split(data, "val:select", transform, select_size=first).indices)
    keep = [i for i in full.indices if i not in first]
    view = Subset(full.dataset, keep)
    view.classes = full.dataset.classes
    return view


def scoring_half(parent_spec: str, data: Path, first: int = 1000, batch_size: int = 250, workers: int | None = None):
    """The parent, a loader over the scoring half with its eval transform, and the parent's scores there."""
    from posthoc import load_model
    from posthoc.data import eval_transform, make_loader, resolve_data_config
    from posthoc.evaluate import evaluate

    parent = load_model(parent_spec)
    loader = make_loader(inner_holdout(data, eval_transform(resolve_data_config(parent)), first), batch_size, workers=workers)
    return parent, loader, evaluate(parent, loader, show_progress=False)
