"""``posthoc distill``: an ensemble artifact's gain in one network at the parent's inference cost.

The student (by default the artifact's own parent) trains on the training split to match the artifact's
predictions (:mod:`posthoc.distillation`), is calibrated on the select part like any artifact, and is
written as an ordinary one-member artifact that records its teacher and its cost in parent-epochs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..artifact import read_config, save
from ..calibration import candidates_for, choose
from ..command_options import DISTILL, DistillConfig, StudentOptions
from ..cost import flops_ratio
from ..distillation import distillation_cost, student_recipe, student_steps, train_student
from ..ensemble import Ensemble, MetricKey, Provenance
from ..errors import PosthocError
from ..evaluate import evaluate, headline
from ..fused import EnsembleModule
from ..options import REQUIRED, DataOptions, LoaderOptions, OutputOptions
from ..pipeline import SELECT, TRAIN, Output, prepare
from ..runtime import seed_everything
from ..sources import artifact_dir, is_artifact, load_artifact, load_model, member_name, storage_dtype
from ..temperature import calibrated


def distill(
    teacher: str,
    data: str | Path = REQUIRED,
    out: str | Path = REQUIRED,
    *,
    config: DistillConfig | None = None,
    log: Callable[[str], None] = print,
    command: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Distil the artifact ``teacher`` into one network written as an artifact at ``out``.

    ``config`` (or its fields as keyword arguments) is the student's recipe; ``student`` defaults to the
    teacher's first source (the parent it was built from); any spec with the same classes works (e.g. a
    smaller timm model). The teacher is never changed. The other ``options`` are :data:`posthoc.command_options.DISTILL`' fields.
    Returns the student's, its starting point's and the teacher's metrics on the select part, the
    estimated cost in parent-epochs and ``out``.
    """
    groups, rest = DISTILL.split({**options, "data": data, "out": out})
    if rest:
        raise PosthocError(f"unknown option {', '.join(sorted(rest))}")
    cfg = config or groups[DistillConfig]
    output, chosen = groups[OutputOptions], groups[StudentOptions]
    if not is_artifact(teacher):
        raise PosthocError(f"{teacher} is not an ensemble artifact; distill the artifact that posthoc boost or ensemble wrote")
    sources = read_config(artifact_dir(teacher)).get("sources") or []
    student_spec = chosen.student or (sources[0] if sources else None)
    if student_spec is None:
        raise PosthocError(f"{teacher} records no source model to start the student from; pass --student SPEC")

    def load(spec: str) -> nn.Module:
        if spec == teacher:
            return load_artifact(teacher).eval()
        try:
            model = load_model(spec)
        except PosthocError as e:
            if chosen.student:
                raise
            raise PosthocError(
                f"cannot load the teacher's recorded parent {spec!r} from {Path.cwd()} ({e}); pass --student SPEC"
            ) from None
        if getattr(model, "returns_probabilities", False):
            raise PosthocError(f"--student {spec} is an artifact; pass a checkpoint (one network) to train")
        return model

    run = prepare(
        [student_spec, teacher],
        groups[DataOptions],
        load=load,
        parts=(TRAIN, SELECT),
        outputs=[Output(Path(output.out))],
        overwrite=output.overwrite,
        loader=groups[LoaderOptions],
    )
    student, ensemble_module = run.models
    select_loader = run.select_loader(256)
    teacher_views = _teacher_views(ensemble_module, chosen.teacher_tta, select_loader, run.device, log)
    seed_everything(cfg.seed)
    teacher_ratio = flops_ratio(ensemble_module, student)
    student_before = headline(evaluate(student, select_loader, device=run.device, show_progress=False))
    teacher_metrics = headline(evaluate(ensemble_module, select_loader, device=run.device, show_progress=False))
    train_set = run.train_set(cfg.augment)
    steps = student_steps(len(train_set), cfg)
    cost = distillation_cost(cfg, teacher_ratio)
    log(
        f"distilling {teacher} ({ensemble_module.num_members} members, {teacher_ratio:.2f}x FLOPs) into {student_spec}: "
        f"{steps} steps ({cfg.epochs:g} epochs), about {cost:.2f} parent-epochs of compute"
    )
    losses = train_student(
        student, ensemble_module, train_set, cfg, run.device, workers=run.workers, show_progress=output.progress
    )
    window = max(1, len(losses) // 10)
    ensemble = Ensemble.from_models([student], [member_name(student_spec)])
    measured: dict[str, Any] = {
        "teacher": str(teacher),
        "teacher_members": ensemble_module.num_members,
        "teacher_flops_ratio": round(teacher_ratio, 4),
        "teacher_views": teacher_views,
        "teacher_select": teacher_metrics,
        "student_select_before": student_before,
        "steps": len(losses),
        "first_loss": round(sum(losses[:window]) / window, 5),
        "last_loss": round(sum(losses[-window:]) / window, 5),
        "cost_parent_epochs": round(cost, 3),
        "optimizer": student_recipe(student, cfg).record(),
    }
    if chosen.temperature_scaling:
        ensemble, fit = calibrated(ensemble, select_loader, run.device)
        measured["temperature"] = fit
    student_after = headline(
        evaluate(EnsembleModule(ensemble).to(run.device), select_loader, device=run.device, show_progress=False)
    )
    part = str(run.select)
    provenance = Provenance(
        method="distill",
        config={"teacher": str(teacher), "student": student_spec, **dataclasses.asdict(cfg)},
        measured=measured,
        sources=[student_spec],
        data=run.data_record(earlier=getattr(ensemble_module, "posthoc_config", {}).get("data") or {}),
        metrics={
            str(MetricKey(part)): student_after,
            str(MetricKey(part, "teacher")): teacher_metrics,
            str(MetricKey(part, "parent")): student_before,
        },
        command=command,
    )
    save(ensemble, output.out, provenance, overwrite=output.overwrite, dtype=storage_dtype([student]))
    return {
        "out": str(output.out),
        "student": student_after,
        "teacher": teacher_metrics,
        "before": student_before,
        "cost_parent_epochs": cost,
        "teacher_flops_ratio": teacher_ratio,
    }


def _teacher_views(teacher: EnsembleModule, tta: str, loader, device, log) -> dict[str, Any]:
    """The teacher's test-time views for the targets (:func:`posthoc.calibration.choose`); a teacher that gets
    other views than it stores gets its temperature decided again for them (the artifact on disk is unchanged)."""
    stored = {"views": list(teacher.views), "temperature": teacher.temperature}
    if tta == "stored":
        return {"chosen": stored, "tta": tta}
    picked, t, record = choose(teacher, loader, device, candidates_for(teacher, tta), temperature="cv", log=log)
    if picked.views != tuple(teacher.views):
        teacher.views, teacher.temperature = picked.views, t
    return {**record["views"], "tta": tta, "stored": stored, "temperature": teacher.temperature}
