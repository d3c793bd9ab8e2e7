"""Building artifacts: ``boost`` (load parents and data, run a method, measure, write) and
``ensemble_checkpoints`` (a plain deep ensemble).

Every method goes through :func:`boost`, so every artifact records its data, hyper-parameters,
measurements and build-time metrics the same way (a :class:`~posthoc.ensemble.Provenance`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from . import data as data_mod
from . import distributed
from .artifact import check_output, save
from .calibrate import calibrated
from .cost import cost_summary, fits
from .distill import DistillConfig
from .distill import distill as distill_artifact
from .ensemble import Combine, Ensemble, Provenance
from .errors import PosthocError
from .evaluate import evaluate, headline
from .fused import EnsembleModule
from .methods import BoostContext, get_method, make_config
from .methods.base import Stopwatch
from .paths import ensure_writable
from .runtime import resolve_device, resolve_dtype, seed_everything
from .sources import is_artifact, load_model, member_name, storage_dtype


def default_out(specs: list[str], method: str) -> Path:
    """``runs/<first model>-<method>``: a readable default output directory."""
    name = Path(specs[0].split(":", 1)[-1].rstrip("/")).name or specs[0]
    name = re.sub(
        r"[^A-Za-z0-9_.-]+", "_", Path(name).stem if Path(name).suffix in (".safetensors", ".pth", ".pt", ".bin") else name
    )
    return Path("runs") / f"{name}-{method}"


def _quiet(message: str) -> None:
    """Where the other processes' log lines go: rank 0 prints for all of them."""


def runner_outputs(cfg: Any) -> list[Path]:
    """Files a method's options ask it to write besides the artifact (checked writable before any work)."""
    return [Path(v) for k, v in vars(cfg).items() if k.startswith("save_") and v]


def check_label_space(specs: Sequence[str], models: Sequence[nn.Module]) -> None:
    """Models to combine must predict the same classes in the same order; one line naming the odd one out."""
    first = models[0]
    for spec, model in zip(specs[1:], models[1:]):
        if getattr(model, "returns_probabilities", False):
            raise PosthocError(f"{spec} is already an ensemble artifact; pass the checkpoints it was built from")
        if model.num_classes != first.num_classes:
            raise PosthocError(
                f"{spec} predicts {model.num_classes} classes but {specs[0]} predicts {first.num_classes}; members must share a label space"
            )
        a, b = first.pretrained_cfg.get("label_names"), model.pretrained_cfg.get("label_names")
        if a and b and list(a) != list(b):
            raise PosthocError(f"{spec} orders its classes differently from {specs[0]}; members must share a label space")
    if getattr(first, "returns_probabilities", False):
        raise PosthocError(f"{specs[0]} is already an ensemble artifact; pass the checkpoints it was built from")


def ensemble_checkpoints(
    specs: list[str],
    out: str | Path,
    *,
    combine: str = "prob_mean",
    arch: str | None = None,
    overwrite: bool = False,
    dtype: str = "auto",
    command: str | None = None,
) -> Ensemble:
    """Write a deep-ensemble artifact of several checkpoints (members may differ in architecture), its
    weights stored in ``dtype`` (``auto``: the widest dtype of the checkpoints)."""
    if len(specs) < 2:
        raise PosthocError("an ensemble needs at least two models")
    if combine == "coupling":
        raise PosthocError("the coupling rule needs training; use 'posthoc boost ... --method supernet'")
    out = Path(out)
    check_output(out, overwrite)
    models = []
    for spec in specs:  # in order, so the first artifact among them is the one named
        model = None if is_artifact(spec) else load_model(spec, arch=arch)
        if model is None or getattr(model, "returns_probabilities", False):
            raise PosthocError(f"{spec} is already an ensemble artifact; pass the checkpoints it was built from")
        models.append(model)
    check_label_space(specs, models)
    ensemble = Ensemble.from_models(models, [member_name(s) for s in specs], Combine(rule=combine))
    provenance = Provenance(method="ensemble", config={"combine": combine}, sources=list(specs), command=command)
    save(ensemble, out, provenance, overwrite=overwrite, dtype=storage_dtype(models, dtype))
    return ensemble


def boost(
    models: list[str],
    method: str,
    data: str | Path,
    out: str | Path | None = None,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    train_split: str = "train",
    val_split: str = "val",
    select_size: int | None = None,
    device: str = "auto",
    workers: int | None = None,
    preprocessing: dict[str, Any] | None = None,
    overwrite: bool = False,
    temperature_scaling: bool = True,
    inference_budget: float | None = None,
    distill: DistillConfig | None = None,
    subset: int | None = None,
    class_map: str | Path | None = None,
    skip_bad_images: bool = False,
    dtype: str = "auto",
    amp: bool = False,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
    command: str | None = None,
    **config: Any,
) -> dict[str, Any]:
    """Build an ensemble artifact from ``models`` with ``method`` and write it to ``out``.

    Args:
        models: one model spec (or several, for methods that merge checkpoints).
        method: a registered method name (``posthoc methods`` lists them).
        data: ImageFolder root with ``train_split`` and ``val_split`` folders.
        out: artifact directory (default ``runs/<model>-<method>``).
        train_split: images a method may train on.
        val_split: split whose *select* part (``select_size`` images, default 40%) a method tunes and
            selects on; its *report* part is never touched.
        temperature_scaling: fit one temperature on the select part as the final step (stored in the
            artifact's combine rule; :mod:`posthoc.calibrate`), for every method but hard votes.
        inference_budget: the artifact's forward FLOPs per image may be at most this many times the
            parent's (the shared prefix counted once); each method maps it to its own knobs
            (``Method.fit_budget``), and options given explicitly in ``config`` override it with a note.
        distill: distil the artifact into one network as the final step (:mod:`posthoc.distill`): the
            student is written to ``out`` and the ensemble it learned from to ``<out>-teacher``.
        subset: use a fixed random sample of this many training images (and at most as many select
            images), for a quick look.
        class_map: a file naming the data's classes in the model's class order (see :mod:`posthoc.data`).
        skip_bad_images: skip unreadable images (counted) instead of stopping at the first.
        dtype: the dtype the artifact stores its weights in; ``auto`` keeps the parent checkpoint's.
        amp: mixed precision in the method's training loops (float16 with a grad scaler on CUDA, bfloat16 on CPU).
        warn: where deprecation lines and warnings go (default: Python warnings).
        **config: the method's hyper-parameters (its ``Config`` fields).

    Returns:
        A summary: ``out``, ``seconds`` (method wall time), the ensemble's and the first parent's
        metrics on the select part, what the method measured (``notes``), ``members`` and the inference
        ``cost`` (members, parameters, FLOPs and measured time ratios against the parent).

    Under torchrun (:mod:`posthoc.distributed`) every process calls ``boost``: the method splits its work
    among them, then rank 0 alone calibrates, measures and writes the artifact, once every process has
    done its share; every process returns the summary.
    """
    if not distributed.is_main():  # rank 0 speaks for every process
        log = warn = _quiet
    method_cls = get_method(method)
    cfg = make_config(method_cls.Config, config, warn=warn)
    if inference_budget is not None and not inference_budget >= 1:
        raise PosthocError(
            f"--inference-budget must be at least 1.0 (one network costs 1.0x the parent), got {inference_budget:g}"
        )
    if len(models) < method_cls.min_parents or (method_cls.max_parents is not None and len(models) > method_cls.max_parents):
        most = method_cls.max_parents
        allowed = f"{method_cls.min_parents}" + ("" if most == method_cls.min_parents else f" to {most or 'any number of'}")
        raise PosthocError(f"method '{method}' takes {allowed} model(s), got {len(models)}")
    data_mod.check_loader_options(workers=workers, subset=subset, select_size=select_size)
    data_mod.check_preprocessing(preprocessing)
    if dtype != "auto":
        resolve_dtype(dtype)
    out = Path(out) if out is not None else default_out(models, method)
    final_out = out
    if distill is not None:
        out = out.with_name(f"{out.name}-teacher")
        check_output(final_out, overwrite)
    check_output(out, overwrite)  # before any work, not after an hour of it
    for extra in runner_outputs(cfg):
        ensure_writable(extra, "output file")
    dev = resolve_device(device)
    log(f"loading {', '.join(models)} ...")
    parents = [load_model(spec, arch=arch, num_classes=num_classes, warn=warn).to(dev) for spec in models]
    if any(getattr(p, "returns_probabilities", False) for p in parents):
        raise PosthocError("boost starts from checkpoints, not from an ensemble artifact; pass the model it was built from")
    check_label_space(models, parents)
    data_config = data_mod.resolve_data_config(parents[0], preprocessing)
    labels = parents[0].pretrained_cfg.get("label_names")
    select_spec = data_mod.SplitSpec(data_mod.SplitSpec.parse(val_split).split, "select")
    eval_tf = data_mod.eval_transform(data_config)
    log(f"indexing {data} ...")
    train_source = data_mod.open_source(data, data_mod.SplitSpec.parse(train_split).split)
    select_source = data_mod.open_source(data, select_spec.split)
    options = {"label_names": labels, "class_map": class_map, "skip_bad": skip_bad_images}
    select_set = data_mod.open_split(select_source, select_spec, eval_tf, select_size=select_size, subset=subset, **options)
    train_set = data_mod.open_split(train_source, train_split, None, subset=subset, **options)
    for name, ds in (("training", train_set), ("validation", select_set)):
        if len(ds.classes) != parents[0].num_classes:
            raise PosthocError(
                f"the model predicts {parents[0].num_classes} classes but the {name} data has {len(ds.classes)} classes; "
                "point --data at its label space, or map the data's classes with --class-map FILE"
            )
    log(f"{len(train_set)} training images, {len(select_set)} select images of {select_spec}")

    quick_look = subset

    def make_train_loader(batch_size, shuffle, seed, augment, subset, sample=None, shard=None):
        tf = data_mod.train_transform(data_config, augment)
        ds = data_mod.open_split(train_source, train_split, tf, subset=subset or quick_look, **options)
        return data_mod.make_loader(
            ds, batch_size, shuffle=shuffle, seed=seed, workers=workers, drop_last=shuffle, sample=sample, shard=shard
        )

    def make_select_loader(batch_size, subset, shard=None):
        ds = data_mod.open_split(
            select_source, select_spec, eval_tf, select_size=select_size, subset=subset or quick_look, **options
        )
        return data_mod.make_loader(ds, batch_size, workers=workers, shard=shard)

    ctx = BoostContext(
        parents=parents,
        parent_specs=list(models),
        data_config=data_config,
        device=dev,
        make_train_loader=make_train_loader,
        make_select_loader=make_select_loader,
        train_size=len(train_set),
        select_size=len(select_set),
        log=log,
        show_progress=show_progress,
        temperature_scaling=temperature_scaling,
        amp=amp,
    )
    runner = method_cls(cfg)
    if inference_budget is not None:
        for line in runner.fit_budget(parents, inference_budget, set(config)):
            log(line)
    seed_everything(cfg.seed)
    clock = Stopwatch()
    ensemble = runner.build(ctx)  # every process does its share; the ensemble is complete on rank 0
    distributed.barrier()  # rank 0 may have trained alone for a while: wait without a time limit
    skipped_elsewhere = int(distributed.sum_across(data_mod.skipped_images())) - data_mod.skipped_images()

    def finish() -> dict[str, Any]:  # rank 0: calibrate, measure, write
        nonlocal ensemble
        loader = data_mod.make_loader(select_set, 256, workers=workers)
        if temperature_scaling and ensemble.combine.rule != "vote":  # a one-parameter fit, kept only where it helps
            ensemble, fit = calibrated(ensemble, loader, dev, only_if_it_helps=True)
            ctx.note("temperature", fit)
            cv = fit["cross_validated"]
            if fit["applied"]:
                log(
                    f"temperature {fit['temperature']:.4g}: select NLL {fit['select_before']['nll']:.4f} -> "
                    f"{fit['select_after']['nll']:.4f}, ECE {fit['select_before']['ece']:.2f}% -> {fit['select_after']['ece']:.2f}%"
                )
            else:
                log(
                    f"no temperature: on held-out halves of the select part it would give NLL {cv['nll_with_temperature']:.4f} "
                    f"against {cv['nll_without']:.4f} without"
                )
        seconds = clock.seconds

        module = EnsembleModule(ensemble).to(dev)
        ens_metrics = headline(evaluate(module, loader, device=dev, show_progress=False))
        parent_metrics = headline(evaluate(parents[0], loader, device=dev, show_progress=False))
        cost = cost_summary(module, parents[0])
        if inference_budget is not None:
            cost["budget"] = inference_budget
            if not fits(cost["flops_ratio"], inference_budget):
                (warn or log)(
                    f"the artifact costs {cost['flops_ratio']:.2f}x the parent's FLOPs, over --inference-budget "
                    f"{inference_budget:g}, because of the options given explicitly"
                )
        ctx.note("inference_cost", cost)
        provenance = Provenance(
            method=method,
            config=dataclasses.asdict(runner.config),
            measured=ctx.notes,
            include_parent=runner.includes_parent(),
            sources=list(models),
            data=data_mod.data_record(data, train_split, select_spec, len(select_set), data_config),
            # wall time is reported, not stored: the same seed must give a bit-identical artifact
            metrics={str(select_spec): ens_metrics, f"parent on {select_spec}": parent_metrics},
            command=command,
        )
        log(f"writing {out} ...")
        save(ensemble, out, provenance, overwrite=overwrite, dtype=storage_dtype(parents, dtype))
        skipped = skipped_elsewhere + data_mod.skipped_images()
        if skip_bad_images and skipped:
            (warn or log)(f"skipped {skipped} unreadable image(s) (see the warnings above)")
        student = None
        if distill is not None:
            student = distill_artifact(
                str(out),
                data,
                final_out,
                config=distill,
                train_split=train_split,
                val_split=val_split,
                temperature_scaling=temperature_scaling,
                device=device,
                workers=workers,
                overwrite=overwrite,
                show_progress=show_progress,
                log=log,
                command=command,
            )
        return {
            "out": str(out),
            "seconds": seconds,
            "ensemble": ens_metrics,
            "parent": parent_metrics,
            "notes": ctx.notes,
            "members": ensemble.num_members,
            "cost": cost,
            "student": student,
        }

    return distributed.on_main(finish)
