"""``posthoc calibrate``: the cheapest fixes there are, chosen on the select part without training:
test-time views (``--tta auto``: the mirrored image where it helps) and a temperature.

A checkpoint becomes a calibrated one-member artifact; an artifact gets its views and temperature chosen
again (its weights file stays bit-identical, and an artifact tuned on a select part is calibrated on that
same part). The step itself is :func:`posthoc.calibration.finish`, the one every ``boost`` ends with; here
the temperature is always fitted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..artifact import read
from ..artifact import save as save_artifact
from ..calibration import finish
from ..command_options import CALIBRATE, CalibrateOptions
from ..ensemble import Ensemble, MetricKey, Provenance
from ..fused import EnsembleModule
from ..options import (
    REQUIRED,
    DataOptions,
    LoaderOptions,
    ModelOptions,
    OutputOptions,
    PreprocessingOptions,
    ViewOptions,
)
from ..pipeline import SELECT, Output, prepare
from ..sources import artifact_dir, is_artifact, load_model, member_name, storage_dtype


def calibrate(
    spec: str,
    data: Any = REQUIRED,
    out: str | Path = REQUIRED,
    *,
    command: str | None = None,
    log: Callable[[str], None] = print,
    **options: Any,
) -> dict[str, Any]:
    """Write ``spec`` with a temperature fitted on ``data``'s select part as an artifact at ``out``
    (``options``: :data:`posthoc.command_options.CALIBRATE`' fields). Returns the temperature and the select-part metrics before
    and after."""
    groups, _ = CALIBRATE.split({**options, "data": data, "out": out})
    output = groups[OutputOptions]
    found: dict[str, Any] = {}

    def load(name: str) -> nn.Module:
        if is_artifact(name):
            ensemble, config = read(artifact_dir(name))  # the stored tensors, in their stored dtypes
            found.update(ensemble=ensemble, provenance=Provenance.from_config(config), dtype=None)
            module = EnsembleModule(ensemble.as_float32())
            module.posthoc_config = config
            return module
        model = load_model(name, arch=groups[ModelOptions].arch)
        found.update(
            ensemble=Ensemble.from_models([model], [member_name(name)]),
            provenance=Provenance(method="calibrate", sources=[name]),
            dtype=storage_dtype([model]),
        )
        return model

    run = prepare(
        [spec],
        groups[DataOptions],
        load=load,
        parts=(SELECT,),
        outputs=[Output(Path(output.out))],
        overwrite=output.overwrite,
        loader=groups[LoaderOptions],
        preprocessing=groups[PreprocessingOptions],
    )
    dataset = run.sets[SELECT]
    tta = groups[ViewOptions].tta
    rule = {"on": "always", "auto": "cv", "off": "off"}[groups[CalibrateOptions].temperature]
    result, record = finish(found["ensemble"], run.select_loader(256), run.device, tta=tta, temperature=rule, log=log)
    fit = record["temperature"]  # None with --temperature off
    if fit is not None:
        log(
            f"temperature {fit['temperature']:.4g} on {len(dataset)} images of {run.select}: NLL "
            f"{fit['select_before']['nll']:.4f} -> {fit['select_after']['nll']:.4f}, ECE {fit['select_before']['ece']:.2f}% -> "
            f"{fit['select_after']['ece']:.2f}%" + ("" if fit.get("applied", True) else " on held-out halves: not kept")
        )
    provenance: Provenance = found["provenance"]
    measured = dict(provenance.measured)
    measured["calibration"] = {
        **(fit or {"temperature": float(result.combine.temperature)}),
        **({"command": command} if command else {}),
    }
    measured["views"] = record["views"]
    fresh = run.data_record(earlier=provenance.data, preprocessing=False)  # the digests of every image tuned on
    digests = {"tuned_images": fresh["tuned_images"]} if "tuned_images" in fresh else {}
    data_record = {**provenance.data, **digests} if provenance.data else fresh
    metrics = dict(provenance.metrics)
    if fit is not None:
        metrics[str(MetricKey(str(run.select), "calibrated"))] = fit["select_after"]
    provenance = dataclasses.replace(
        provenance, measured=measured, data=data_record, metrics=metrics, command=provenance.command or command
    )
    save_artifact(result, output.out, provenance, overwrite=output.overwrite, dtype=found["dtype"])
    return {
        "out": str(output.out),
        "temperature": float(result.combine.temperature),
        "views": list(result.combine.views),
        "before": fit and fit["select_before"],
        "after": fit and fit["select_after"],
        "images": len(dataset),
    }
