"""``posthoc export``: one ONNX, ``torch.export`` (``.pt2``) or AOTInductor file per artifact, for serving engines.

The graph, its preprocessing metadata and its validation against ``posthoc.load`` are :mod:`posthoc.export`;
this command checks where it writes (never over the artifact's own files), loads the artifact, and writes
the file and the JSON beside it through a temporary directory renamed into place.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import artifact, sources
from .. import export as graph
from ..data import resolve_data_config
from ..errors import PosthocError
from ..fused import EnsembleModule
from ..paths import os_errors, public_mode, remove_stale_siblings, temporary_sibling
from ..pipeline import Output, check_outputs


def export_artifact(
    source: str | Path | EnsembleModule,
    out: str | Path,
    format: str | None = None,
    *,
    members_output: bool = False,
    validate: bool = True,
    opset: int | None = None,
    overwrite: bool = False,
    tolerance: float = graph.TOLERANCE,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write ``source`` (an artifact spec as ``posthoc.load`` takes, or a loaded module) as one graph file.

    ``format``: ``onnx`` (the dynamo exporter; ``opset`` defaults to torch's), ``pt2``
    (``torch.export.save``) or ``aoti`` (an AOTInductor package compiled for CPU); by default ``pt2`` when
    ``out`` ends in ``.pt2``, else ``onnx``. The graph's input is ``images`` (N, C, H, W), already
    preprocessed, with N dynamic; its outputs are ``probs`` (N, classes) and, with ``members_output``, ``member_probs``
    (K, N, classes). A JSON file beside ``out`` (same name, ``.json``) records the preprocessing, the
    outputs, the combine rule and the validation. With ``validate`` the file is run on batches of 1, 2
    and 7 generated images and compared with the loaded artifact: a max abs difference above
    ``tolerance`` raises :class:`PosthocError` and nothing is written. ``out`` must not exist unless
    ``overwrite``, and never names one of the artifact's own files.

    Returns what was written: ``out``, ``metadata`` (the JSON's path), ``files``, ``bytes``, ``format``,
    ``outputs``, ``max_abs_diff`` (None without validation), ``batches`` and ``seconds``.
    """

    start = time.perf_counter()
    say = log or (lambda message: None)
    out = Path(out)
    format = format or ("pt2" if out.suffix == ".pt2" else "onnx")
    if format not in graph.FORMATS:
        raise PosthocError(f"unknown export format '{format}'; use onnx, pt2 or aoti")
    if opset is not None and format != "onnx":
        raise PosthocError("--opset applies to the onnx format only")
    if not tolerance > 0:
        raise PosthocError(f"the validation tolerance must be positive, got {tolerance}")
    graph.require(format, validate)
    metadata_path = out.with_suffix(".json")
    if out.suffix == ".json":
        raise PosthocError(f"--out {out} is where the metadata JSON goes; name the {format} file, e.g. model.{format}")
    if isinstance(source, EnsembleModule):
        module, name = source, str(getattr(source, "posthoc_name", type(source).__name__))
        input_dir = Path(name) if artifact.is_artifact_dir(name) else None
    else:
        name = str(source)
        input_dir = sources.artifact_dir(source) if not str(source).startswith("hf-hub:") else None
        module = None
    data_path = out.with_name(out.name + ".data")  # an ONNX graph over 2 GB keeps its weights there
    check_outputs([Output(p, "export file") for p in (out, metadata_path, data_path)], overwrite, inputs=[input_dir])
    if module is None:
        module = sources.load_artifact(source)
    if any(t.device.type != "cpu" for t in [*module.parameters(), *module.buffers()]):
        module = copy.deepcopy(module).cpu()  # traced and validated on CPU; the file runs anywhere
    module = module.eval()
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    data_config = resolve_data_config(module)
    shape = tuple(int(s) for s in data_config["input_size"])
    wrapper = graph.ExportableEnsemble(module, members_output=members_output).eval()
    names = graph.layer_names(wrapper)

    say(f"tracing {name} ({module.num_members} members, input {shape}) with torch.export")
    program = graph.trace(wrapper, torch.zeros(2, *shape, dtype=dtype), names, name)
    outputs = list(graph.OUTPUT_NAMES[: 2 if members_output else 1])
    metadata = graph.metadata(module, format, out, data_config, outputs, opset, dtype)

    remove_stale_siblings(out)
    with os_errors(f"writing {out}"):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(out)
        tmp.mkdir()
    try:
        target = tmp / out.name
        with os_errors(f"writing {out}"):
            if format == "onnx":
                say(f"converting to ONNX (opset {opset or 'default'})")
                graph.save_onnx(program, target, metadata, opset, name)
            elif format == "aoti":
                say("compiling with AOTInductor (a C++ compiler builds the package; this takes a while)")
                graph.save_aoti(program, target, name)
            else:
                graph.save_pt2(program, target, metadata)
        diff = None
        if validate:
            diff = graph.validate(module, target, format, shape, dtype, members_output, tolerance)
            say(f"validated on batches {', '.join(map(str, graph.VALIDATION_BATCHES))}: max abs difference {diff:.2e}")
        metadata["validation"] = (
            {"batches": list(graph.VALIDATION_BATCHES), "max_abs_diff": diff, "tolerance": tolerance, "reference": "posthoc.load"}
            if validate
            else None
        )
        with os_errors(f"writing {metadata_path}"):
            (tmp / metadata_path.name).write_text(json.dumps(metadata, indent=2) + "\n")
            written = sorted(tmp.iterdir(), key=lambda p: p.name != metadata_path.name)  # the JSON first, the graph last
            for file in written:
                public_mode(file)
                os.replace(file, out.parent / file.name)
            if not any(f.name == data_path.name for f in written):
                data_path.unlink(missing_ok=True)  # weights of the graph this one replaced
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = [str(out.parent / f.name) for f in written]
    return {
        "out": str(out),
        "metadata": str(metadata_path),
        "files": files,
        "bytes": sum(Path(f).stat().st_size for f in files),
        "format": format,
        "outputs": outputs,
        "max_abs_diff": diff,
        "batches": list(graph.VALIDATION_BATCHES) if validate else [],
        "seconds": time.perf_counter() - start,
    }
