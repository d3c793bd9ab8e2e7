"""``posthoc boost``: run a method on a checkpoint and write its artifact; ``posthoc ensemble``: a plain deep ensemble.

Every method goes through :func:`boost`, so every artifact records its data, hyper-parameters,
measurements and build-time metrics the same way (a :class:`~posthoc.ensemble.Provenance`). The steps:
prepare (:func:`posthoc.pipeline.prepare`), build (the method, every process its share under torchrun),
finish (rank 0: the temperature on the select part), measure (select-part metrics and inference cost
against the parent), write, and optionally distil.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from .. import data as data_mod
from .. import distributed
from ..artifact import save
from ..calibration import finish
from ..command_options import BOOST, ENSEMBLE, BoostOptions, DistillConfig, EnsembleOptions
from ..cost import cost_summary, fits
from ..ensemble import Combine, Ensemble, MetricKey, Provenance
from ..errors import PosthocError
from ..evaluate import evaluate, headline
from ..fused import EnsembleModule
from ..labels import check_label_space
from ..methods import BoostContext, Method, get_method
from ..methods.base import Stopwatch
from ..options import (
    REQUIRED,
    DataOptions,
    LoaderOptions,
    ModelOptions,
    OutputOptions,
    PreprocessingOptions,
    ViewOptions,
    declared_paths,
    make_config,
)
from ..pipeline import SELECT, TRAIN, Output, Run, check_outputs, prepare
from ..runtime import seed_everything
from ..sources import is_artifact, load_model, member_name, storage_dtype
from .distill import distill as distill_artifact


def default_out(specs: list[str], method: str) -> Path:
    """``runs/<first model>-<method>``: a readable default output directory."""
    name = Path(specs[0].split(":", 1)[-1].rstrip("/")).name or specs[0]
    name = re.sub(
        r"[^A-Za-z0-9_.-]+", "_", Path(name).stem if Path(name).suffix in (".safetensors", ".pth", ".pt", ".bin") else name
    )
    return Path("runs") / f"{name}-{method}"


def runner_outputs(runner: Method) -> list[Output]:
    """Files a method's options ask it to write besides the artifact (options declared ``role="output"``),
    checked before any work; a rerun replaces one only where the method wrote it (:meth:`Method.wrote`)."""
    return [
        Output(path, f"{name} file", replace=True, ours=type(runner).wrote)
        for name, path in declared_paths(runner.config, "output")
    ]


def runner_inputs(runner: Method) -> list[Path]:
    """Files a method's options ask it to read (options declared ``role="input"``)."""
    return [path for _, path in declared_paths(runner.config, "input")]


def load_checkpoint(spec: str, arch: str | None = None, num_classes: int | None = None, warn=None) -> nn.Module:
    """A checkpoint to start from; an ensemble artifact is refused (boost and distill train networks)."""
    model = load_model(spec, arch=arch, num_classes=num_classes, warn=warn)
    if getattr(model, "returns_probabilities", False):
        raise PosthocError(
            f"{spec} is an ensemble artifact; start from a checkpoint (one network), e.g. the one it was built from"
        )
    return model


def _quiet(message: str) -> None:
    """Where the other processes' log lines go: rank 0 prints for all of them."""


def boost(
    models: list[str],
    method: str,
    data: str | Path = REQUIRED,
    out: str | Path | None = None,
    *,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
    command: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Build an ensemble artifact from ``models`` with ``method`` and write it to ``out``.

    Args:
        models: one model spec (or several, for methods that merge checkpoints).
        method: a registered method name (``posthoc methods`` lists them).
        data: ImageFolder root with ``train_split`` and ``val_split`` folders (or a .tar, or hfds/NAME).
        out: artifact directory (default ``runs/<model>-<method>``).
        **options: the fields of :data:`posthoc.command_options.BOOST`' groups (:class:`~posthoc.options.DataOptions`: a method
            trains only on ``train_split`` and tunes and selects only on the *select* part of
            ``val_split``, never on its report part; :class:`~posthoc.options.PreprocessingOptions`,
            :class:`ModelOptions`, ``workers`` and ``device``, :class:`~posthoc.options.OutputOptions`,
            :class:`BoostOptions`) and the method's hyper-parameters (its ``Config`` fields).
            ``inference_budget``: the artifact's forward FLOPs per image stay within this many parent
            passes (the shared prefix counted once); each method maps it to its own knobs
            (``Method.fit_budget``), and its options given explicitly override it with a note.
            ``distill``: the student is written to ``out`` and the ensemble it learned from to
            ``<out>-teacher``.

    Returns:
        A summary: ``out``, ``seconds`` (method wall time), the ensemble's and the first parent's
        metrics on the select part, what the method measured (``notes``), ``members``, the inference
        ``cost`` (members, parameters, FLOPs and measured time ratios against the parent) and ``student``.

    Under torchrun (:mod:`posthoc.distributed`) every process calls ``boost``: the method splits its work
    among them, then rank 0 alone calibrates, measures and writes the artifact, once every process has
    done its share; every process returns the summary.
    """
    if not distributed.is_main():  # rank 0 speaks for every process
        log = warn = _quiet
    groups, method_values = BOOST.split({**options, "data": data, "out": out}, warn=warn)
    data_opts, model_opts, output, opts = groups[DataOptions], groups[ModelOptions], groups[OutputOptions], groups[BoostOptions]
    runner = _method(method, models, method_values, warn)
    out = Path(output.out) if output.out is not None else default_out(models, method)
    outputs = [Output(out), *runner_outputs(runner)]
    if opts.distill:
        outputs.insert(0, Output(out.with_name(f"{out.name}-teacher")))
    log(f"loading {', '.join(models)} ...")
    run = prepare(
        models,
        data_opts,
        load=lambda spec: load_checkpoint(spec, model_opts.arch, model_opts.num_classes, warn),
        parts=(TRAIN, SELECT),
        outputs=outputs,
        overwrite=output.overwrite,
        inputs=runner_inputs(runner),
        loader=groups[LoaderOptions],
        preprocessing=groups[PreprocessingOptions],
        log=log,
    )
    ctx = _context(run, models, output, opts, log)
    if opts.inference_budget is not None:
        for line in runner.fit_budget(run.models, opts.inference_budget, set(method_values)):
            log(line)
    seed_everything(runner.config.seed)
    skipped_before = data_mod.skipped_images()  # counted per process since it started: this run's is the difference
    clock = Stopwatch()
    ensemble = runner.build(ctx)  # every process does its share; the ensemble is complete on rank 0
    distributed.barrier()  # rank 0 may have trained alone for a while: wait without a time limit
    skipped_here = data_mod.skipped_images() - skipped_before
    skipped_elsewhere = int(distributed.sum_across(skipped_here)) - skipped_here

    def on_rank_zero() -> dict[str, Any]:
        final, teacher = (out, outputs[0].path) if opts.distill else (out, out)
        ensemble_, record = _finish(ensemble, run, groups[ViewOptions].tta, opts, log)
        ctx.note("views", record["views"])
        if record["temperature"] is not None:
            ctx.note("temperature", record["temperature"])
        seconds = clock.seconds
        metrics, cost = _measure(ensemble_, run, opts, warn or log)
        ctx.note("inference_cost", cost)
        provenance = Provenance(
            method=method,
            config=dataclasses.asdict(runner.config),
            measured=ctx.notes,
            include_parent=runner.includes_parent(),
            sources=list(models),
            data=run.data_record(),
            metrics=metrics,  # wall time is reported, not stored: the same seed must give a bit-identical artifact
            command=command,
        )
        log(f"writing {teacher} ...")
        save(ensemble_, teacher, provenance, overwrite=output.overwrite, dtype=storage_dtype(run.models, opts.storage_dtype))
        skipped = skipped_elsewhere + data_mod.skipped_images() - skipped_before
        if run.data.skip_bad_images and skipped:
            (warn or log)(f"skipped {skipped} unreadable image(s) (see the warnings above)")
        student = _distill(teacher, final, run, groups, log, command) if opts.distill else None
        return {
            "out": str(teacher),
            "seconds": seconds,
            "ensemble": metrics[str(MetricKey(str(run.select)))],
            "parent": metrics[str(MetricKey(str(run.select), "parent"))],
            "notes": ctx.notes,
            "members": ensemble_.num_members,
            "cost": cost,
            "student": student,
        }

    return distributed.on_main(on_rank_zero)


def _context(run: Run, models: list[str], output: OutputOptions, opts: BoostOptions, log) -> BoostContext:
    """What the method may use: the prepared parents, loaders over the training split and the select part."""
    return BoostContext(
        parents=run.models,
        parent_specs=list(models),
        data_config=run.data_config,
        device=run.device,
        make_train_loader=run.train_loader,
        make_select_loader=run.select_loader,
        train_size=len(run.sets[TRAIN]),
        select_size=len(run.sets[SELECT]),
        log=log,
        show_progress=output.progress,
        temperature_scaling=opts.temperature_scaling,
        amp=opts.amp,
    )


def _distill(teacher: Path, out: Path, run: Run, groups: dict, log, command: str | None) -> dict[str, Any]:
    """``--distill``: the artifact just written, distilled into one network at ``out`` (:mod:`posthoc.commands.distill`)."""
    opts, output = groups[BoostOptions], groups[OutputOptions]
    return distill_artifact(
        str(teacher),
        run.data.data,
        out,
        config=DistillConfig(epochs=opts.distill_epochs),
        train_split=run.data.train_split,
        val_split=run.data.val_split,
        temperature_scaling=opts.temperature_scaling,
        device=groups[LoaderOptions].device,
        workers=run.workers,
        overwrite=output.overwrite,
        progress=output.progress,
        log=log,
        command=command,
    )


def _method(name: str, models: list[str], values: dict[str, Any], warn) -> Method:
    """The method ``name`` configured from ``values`` (checked), for this many ``models``."""
    method_cls = get_method(name)
    cfg = make_config(method_cls.Config, values, warn=warn)
    least, most = method_cls.min_parents, method_cls.max_parents
    if len(models) < least or (most is not None and len(models) > most):
        allowed = f"{least}" + ("" if most == least else f" to {most or 'any number of'}")
        raise PosthocError(f"method '{name}' takes {allowed} model(s), got {len(models)}")
    return method_cls(cfg)


def _finish(ensemble: Ensemble, run: Run, tta: str, opts: BoostOptions, log) -> tuple[Ensemble, dict[str, Any]]:
    """The last step of every artifact (:func:`posthoc.calibration.finish`): test-time views chosen on the select
    part (within the inference budget), then a temperature kept only where it lowers the two-fold
    cross-validated select NLL (a temperature fitted on a few hundred images of an accurate model can hurt
    the next ones). Hard votes have none."""
    temperature = "cv" if opts.temperature_scaling else "off"
    ensemble, record = finish(
        ensemble,
        run.select_loader(256),
        run.device,
        tta=tta,
        temperature=temperature,
        budget=opts.inference_budget,
        parent=run.model,
        log=log,
    )
    fit = record["temperature"]
    if fit is None:
        return ensemble, record
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
    return ensemble, record


def _measure(ensemble: Ensemble, run: Run, opts: BoostOptions, warn) -> tuple[dict[str, Any], dict[str, Any]]:
    """Select-part metrics of the artifact and of the first parent, and the artifact's inference cost."""
    module = EnsembleModule(ensemble).to(run.device)
    loader = run.select_loader(256)
    metrics = {
        str(MetricKey(str(run.select))): headline(evaluate(module, loader, device=run.device, show_progress=False)),
        str(MetricKey(str(run.select), "parent")): headline(evaluate(run.model, loader, device=run.device, show_progress=False)),
    }
    cost = cost_summary(module, run.model)
    if opts.inference_budget is not None:
        cost["budget"] = opts.inference_budget
        if not fits(cost["flops_ratio"], opts.inference_budget):
            warn(
                f"the artifact costs {cost['flops_ratio']:.2f}x the parent's FLOPs, over --inference-budget "
                f"{opts.inference_budget:g}, because of the options given explicitly"
            )
    return metrics, cost


# ------------------------------------------------------------------------------------- ensemble
def ensemble_checkpoints(specs: list[str], out: str | Path, *, command: str | None = None, warn=None, **options: Any) -> Ensemble:
    """Write a deep-ensemble artifact of several checkpoints (members may differ in architecture), its
    weights stored in ``storage_dtype`` (``auto``: the widest dtype of the checkpoints)."""
    groups, rest = ENSEMBLE.split({**options, "out": out}, warn=warn)
    if rest:
        raise PosthocError(f"unknown option {', '.join(sorted(rest))}")
    opts, output = groups[EnsembleOptions], groups[OutputOptions]
    if len(specs) < 2:
        raise PosthocError("an ensemble needs at least two models")
    if opts.combine == "coupling":
        raise PosthocError("the coupling rule needs training; use 'posthoc boost ... --method supernet'")
    check_outputs([Output(Path(output.out))], output.overwrite, inputs=specs)
    arch = groups[ModelOptions].arch
    models = [load_checkpoint(spec, arch) if not is_artifact(spec) else _refuse_artifact(spec) for spec in specs]
    check_label_space(specs, models)
    ensemble = Ensemble.from_models(models, [member_name(s) for s in specs], Combine(rule=opts.combine))
    provenance = Provenance(method="ensemble", config={"combine": opts.combine}, sources=list(specs), command=command)
    save(ensemble, output.out, provenance, overwrite=output.overwrite, dtype=storage_dtype(models, opts.storage_dtype))
    return ensemble


def _refuse_artifact(spec: str):
    raise PosthocError(f"{spec} is already an ensemble artifact; pass the checkpoints it was built from")
