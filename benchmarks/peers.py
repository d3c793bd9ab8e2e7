"""The alternatives a user would reach for instead of posthoc, run the textbook way for the CIFAR-10 table.

- ``swa``: stochastic weight averaging for one epoch with ``torch.optim.swa_utils`` (``AveragedModel``
  of the weights at ten evenly spaced points of one constant-rate epoch, SGD lr 0.01, momentum 0.9,
  weight decay 5e-4 as the parents were trained, then ``update_bn`` over the training images),
  written in timm's Hub layout so ``posthoc eval`` scores it like any checkpoint;
- ``laplace``: last-layer Laplace with ``laplace-torch`` (KFAC Hessian of the classifier on the
  training images, prior precision by marginal likelihood, probit predictive), scored here on the
  report part with posthoc's metrics, since its predictive is not a network posthoc can store.

``temperature scaling`` needs no code here: it is ``posthoc calibrate --tta none``.
"""

from __future__ import annotations

import time
from importlib.metadata import version
from pathlib import Path

import torch


def swa(parent: str, data: Path, out: Path, epochs: float = 1.0, lr: float = 0.01, snapshots: int = 10) -> float:
    """One epoch of SWA from ``parent``, saved to ``out`` (timm Hub layout); returns the wall seconds."""
    from timm.models import save_for_hf
    from torch.optim.swa_utils import AveragedModel, update_bn

    from posthoc import load_model
    from posthoc.data import eval_transform, make_loader, open_split, resolve_data_config, train_transform
    from posthoc.training import cycle, sgd_with_schedule, train_steps

    start = time.perf_counter()
    model = load_model(parent)
    cfg = resolve_data_config(model)
    loader = make_loader(open_split(data, "train", train_transform(cfg, "light")), 128, shuffle=True, drop_last=True)
    steps = round(epochs * len(loader))
    every = max(1, steps // snapshots)
    averaged = AveragedModel(model)
    opt, _ = sgd_with_schedule(list(model.parameters()), steps, schedule="constant", max_lr=lr, weight_decay=5e-4)
    model.train()
    train_steps(
        model,
        cycle(loader, steps),
        opt,
        steps=steps,
        after_step=lambda s: averaged.update_parameters(model) if s % every == 0 else None,
    )
    update_bn(make_loader(open_split(data, "train", eval_transform(cfg)), 256), averaged)
    final = averaged.module.eval()
    save_for_hf(final, str(out), safe_serialization=True)
    return time.perf_counter() - start


def laplace(parent: str, data: Path, select_size: int | None = None) -> dict:
    """Last-layer KFAC Laplace of ``parent`` fitted on the training images; report-part metrics, wall seconds
    of the fit, and the predictive's forward time over the parent's."""
    from laplace import Laplace

    from posthoc import load_model
    from posthoc.cost import flops_ratio, time_ratio
    from posthoc.data import eval_transform, make_loader, open_split, resolve_data_config
    from posthoc.metrics import ClassificationMetrics

    model = load_model(parent).eval()
    cfg = resolve_data_config(model)
    start = time.perf_counter()
    la = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron")
    la.fit(make_loader(open_split(data, "train", eval_transform(cfg)), 256))
    la.optimize_prior_precision(method="marglik", pred_type="glm", link_approx="probit")
    seconds = time.perf_counter() - start
    metrics = ClassificationMetrics()
    report = make_loader(open_split(data, "val:report", eval_transform(cfg), select_size=select_size), 256)
    with torch.no_grad():
        for x, y in report:
            metrics.update(la(x, pred_type="glm", link_approx="probit"), y)

    class Predictive(torch.nn.Module):
        pretrained_cfg = model.pretrained_cfg

        def forward(self, x):
            return la(x, pred_type="glm", link_approx="probit")

    m = metrics.compute()
    return {
        "metrics": {k: round(v, 5) for k, v in m.items()},
        "reliability": metrics.reliability(),
        "seconds": seconds,
        "time_ratio": time_ratio(Predictive(), model, batch=256),
        "flops_ratio": flops_ratio(Predictive(), model),  # the network once, plus the last layer's covariance
        "images": metrics.count,
        "package": f"laplace-torch {version('laplace-torch')}",
    }


def swa_package() -> str:
    """The package the SWA row uses, for its name."""
    return f"torch {torch.__version__.split('+')[0]} swa_utils"
