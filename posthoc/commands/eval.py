"""``posthoc eval``: score models or artifacts on a split, as timm's ``validate.py`` does, one row each.

:func:`evaluate_spec` is the whole pipeline for one model: prepare it and the split (the select size an
artifact recorded is used by default, and a warning says when the images overlap what it was tuned on),
run :func:`posthoc.evaluate.evaluate`, and return its row. :func:`evaluate_specs` scores several (one
scan of the split), writing each row to the results file as it finishes; a model that fails gets a row
with its error and the others go on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import data as data_mod
from .. import distributed
from ..calibration import with_views
from ..command_options import EVAL, EvalOptions
from ..errors import PosthocError, first_line, printable
from ..evaluate import evaluate
from ..labels import read_real_labels, read_valid_labels
from ..options import (
    DataOptions,
    LoaderOptions,
    ModelOptions,
    OutputOptions,
    PreprocessingOptions,
    ViewOptions,
    declared_paths,
)
from ..pipeline import Output, check_outputs, prepare, recorded_data
from ..results import is_results_file, write_results
from ..runtime import resolve_device, resolve_dtype
from ..sources import expand_specs, load_model
from ..views import describe, views_of


def _checked(options: dict[str, Any]) -> dict[type, Any]:
    groups, rest = EVAL.split(options)
    if rest:
        raise PosthocError(f"unknown option {', '.join(sorted(rest))}")
    opts, data = groups[EvalOptions], groups[DataOptions]
    if groups[ViewOptions].tta == "auto":
        raise PosthocError(
            "eval scores a model as it is and never tunes: use --tta none or flip here; views are chosen on the select "
            "part by posthoc calibrate --tta auto (or boost)"
        )
    if opts.real_labels is not None and (data.skip_bad_images or data.subset is not None):
        raise PosthocError("--real-labels align with every image of the split in order; drop --skip-bad-images and --subset")
    resolve_device(groups[LoaderOptions].device)
    return groups


def evaluate_spec(
    spec: str,
    data: Any,
    split: str = "val",
    *,
    sources: dict[str, data_mod.Source] | None = None,
    warn: Callable[[str], None] = lambda message: None,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate the model or artifact ``spec`` on ``data``'s ``split`` (``val``, ``val:select``, ``val:report``).

    ``data`` is a directory, a .tar, ``hfds/NAME`` or a :class:`posthoc.data.Source`; ``options`` are
    :data:`posthoc.command_options.EVAL`' fields (``valid_labels`` and ``real_labels`` are files as timm's ``validate.py``
    takes them, see :func:`posthoc.evaluate.evaluate`); ``sources`` reuses already indexed splits (several
    models, one scan). Returns :func:`posthoc.evaluate.evaluate`'s result with ``model`` and ``split`` set.
    """
    groups = _checked({**options, "data": data, "split": split})
    opts, model_opts, loader = groups[EvalOptions], groups[ModelOptions], groups[LoaderOptions]
    part = data_mod.SplitSpec.parse(opts.split)
    valid = read_valid_labels(opts.valid_labels) if opts.valid_labels is not None else None

    def load(name: str):
        net = load_model(name, arch=model_opts.arch, warn=warn)
        if model_opts.num_classes is not None and model_opts.num_classes != net.num_classes:
            raise PosthocError(
                f"--num-classes {model_opts.num_classes} would give {name} a new, untrained classifier, and evaluation "
                f"would score chance; evaluate on data of its {net.num_classes} classes (re-heading only makes sense before training)"
            )
        tta = groups[ViewOptions].tta
        if tta is None:
            return net
        views = views_of(tta)
        if getattr(net, "returns_probabilities", False) and tuple(net.views) != views:
            warn(f"scoring {name} with the views {describe(views)} instead of its own {describe(net.views)}, for this run only")
        return with_views(net, views, name)

    run = prepare(
        [spec],
        groups[DataOptions],
        load=load,
        parts=(str(part),),
        outputs=_results_output(opts),
        inputs=[path for _, path in declared_paths(opts, "input")],
        loader=loader,
        preprocessing=groups[PreprocessingOptions],
        label_names=valid is None,
        data_classes=(lambda _: len(valid)) if valid is not None else None,
        sources=sources,
        warn=warn,
    )
    net, dataset = run.model, run.sets[str(part)]
    record = recorded_data(net)
    tuned = data_mod.recorded_digests(record)
    if tuned:  # the images the artifact was tuned on, known by content wherever they are now
        getattr(dataset, "dataset", dataset).with_digests = True
    real = read_real_labels(opts.real_labels, dataset) if opts.real_labels is not None else None
    skipped_before = data_mod.skipped_images()  # the count is per process: this run's share is the difference
    module = torch.compile(net) if opts.compile else net
    for attr in ("num_classes", "pretrained_cfg", "posthoc_name", "returns_probabilities", "num_members", "num_parameters"):
        if hasattr(net, attr) and module is not net:
            setattr(module, attr, getattr(net, attr))
    result = evaluate(
        module,
        run.loader(str(part), loader.batch_size, shard="batches"),
        device=run.device,
        dtype=resolve_dtype(opts.model_dtype),
        amp=opts.amp,
        channels_last=opts.channels_last,
        data_config=run.data_config,
        valid_labels=valid,
        real_labels=real,
        show_progress=groups[OutputOptions].progress,
        tuned=frozenset(int(d, 16) for d in tuned) if tuned else None,
    )
    if result.get("tuned_images"):
        warn(
            f"{result['tuned_images']} of the {result['images']} images evaluated are among the {len(tuned)} this artifact "
            f"was tuned on ('{record.get('tuned_on')}' of {record.get('dataset')}, recognised by content), so its figures are "
            "optimistic; report on images it never saw (the report part of the split it was tuned with)"
        )
    result["model"] = spec
    result["split"] = str(part)
    if run.data.skip_bad_images:
        result["skipped_images"] = int(distributed.sum_across(data_mod.skipped_images() - skipped_before))
    return result


def _results_output(opts: EvalOptions) -> list[Output]:
    """The results file as an output: rewritten by each run, but never a file posthoc did not write."""
    if opts.results_file is None:
        return []
    return [Output(Path(opts.results_file), "results file", replace=True, ours=is_results_file)]


def evaluate_specs(
    specs: Sequence[str],
    data: Any,
    split: str = "val",
    *,
    on_result: Callable[[dict[str, Any]], None] = lambda row: None,
    warn: Callable[[str], None] = lambda message: None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Evaluate several models, one row each; a model that fails gets a row with its ``error`` and the rest
    go on. Rows are written to ``results_file`` as each finishes (so a killed run keeps the finished ones)
    and, at the end, sorted by ``sort`` (a result field, descending; e.g. ``top1``)."""
    groups = _checked({**options, "data": data, "split": split})
    opts = groups[EvalOptions]
    check_outputs(
        _results_output(opts),
        inputs=[*specs, data, groups[DataOptions].class_map, *(path for _, path in declared_paths(opts, "input"))],
    )
    part = data_mod.SplitSpec.parse(split)
    sources = {part.split: data_mod.open_source(data, part.split)}  # one scan of the split for every model
    rows: list[dict[str, Any]] = []
    for spec in specs:
        try:
            row = evaluate_spec(spec, data, split, sources=sources, warn=warn, **options)
        except PosthocError as e:
            row = {"model": spec, "split": str(part), "error": str(e)}
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError, AssertionError, OSError) as e:
            # a model posthoc could not foresee failing: its row says how, and the others still run
            row = {"model": spec, "split": str(part), "error": printable(f"{type(e).__name__}: {first_line(e)}")}
        rows.append(row)
        on_result(row)
        if opts.results_file is not None:
            write_results(rows, opts.results_file)
    if opts.sort is not None:
        rows.sort(key=lambda r: (r.get(opts.sort) is None, -(r.get(opts.sort) or 0)))
        if opts.results_file is not None:
            write_results(rows, opts.results_file)
    return rows


def eval_models(
    models: Sequence[str],
    data: Any,
    *,
    on_result: Callable[[dict[str, Any], bool], None] = lambda row, single: None,
    log: Callable[[str], None] = lambda message: None,
    warn: Callable[[str], None] = lambda message: None,
    **options: Any,
) -> list[dict[str, Any]]:
    """``posthoc eval``: the rows of ``models`` (and ``model_list``'s, wildcards expanded) on ``data``.

    One model: its problems are raised (they are problems with the arguments) and its row goes to
    ``on_result(row, True)`` before the results file is written, so a failed write never loses the
    figures. Several: :func:`evaluate_specs`, each row to ``on_result(row, False)`` as it finishes."""
    groups = _checked({**options, "data": data})
    opts, loader = groups[EvalOptions], groups[LoaderOptions]
    specs = expand_specs(list(models), opts.model_list)
    log(speed_paths(loader.device, amp=opts.amp, channels_last=opts.channels_last, compile=opts.compile))
    rest = {k: v for k, v in options.items() if k not in ("model_list", "split")}
    if len(specs) > 1:
        return evaluate_specs(specs, data, opts.split, on_result=lambda row: on_result(row, False), warn=warn, **rest)
    row = evaluate_spec(specs[0], data, opts.split, warn=warn, **rest)
    on_result(row, True)
    if opts.results_file is not None:
        write_results(row, opts.results_file)
    return [row]


def speed_paths(device: str = "auto", *, amp: bool = False, channels_last: bool | None = None, compile: bool = False) -> str:
    """One line saying which speed paths an evaluation uses. On CUDA, cuDNN's autotuner is switched on here
    (inputs of one size throughout); channels-last defaults to on there. On CPU nothing changes unless asked."""
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    on = {
        "channels-last": cuda if channels_last is None else channels_last,
        f"AMP ({'float16' if cuda else 'bfloat16'})": amp,
        "torch.compile": compile,
        "cudnn.benchmark": cuda,
        "pinned memory": cuda,
    }
    used = [k for k, v in on.items() if v]
    return f"device {dev}; speed paths: {', '.join(used) if used else 'none (CPU defaults)'}"
