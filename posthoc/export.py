"""One ONNX, ``torch.export`` (``.pt2``) or AOTInductor file per artifact, for serving engines.

:func:`posthoc.commands.export.export_artifact` (``posthoc export``) writes one graph that takes the preprocessed image batch (N, C, H, W), N
dynamic, and returns the ensemble's class probabilities (N, classes), and with ``members_output``
each member's probabilities (K, N, classes) as a second output. Everything :class:`posthoc.load
<posthoc.fused.EnsembleModule>` computes is inside: BatchNorm folded into the convolutions, the shared
prefix once, the member-specific part, the coupling layer, temperature and combine rule.

The graph is traced (``torch.export``, non-strict) from the :class:`~posthoc.fused.EnsembleModule`
itself: :class:`ExportableEnsemble` calls its ``forward`` with the members run one after another
(strategy ``loop``, the executors' prefix and suffix), so whatever that forward does (combine rule,
temperature, test-time views) is what the file does, with no second implementation to keep in step.
The members are *unrolled*: K copies of the member suffix after one shared prefix. Stacking them
(``vmap``: grouped convolutions, batched matrix products) does not export with a dynamic batch (the
batching rule of convolutions reads the batch size, so ``torch.export`` fixes it). Exported at a fixed
batch for comparison, the stacked graph of four full ResNet-18s ran in ONNX Runtime on CPU at 0.60x the
unrolled graph's speed at batch 32 and 0.49x at batch 256 (1.3x at batch 1), and at the same speed for
members that differ only in the classifier (``benchmarks/results/inference.md``).

Preprocessing travels with the file: timm's evaluation preprocessing (input size, interpolation,
crop_pct, crop_mode, mean, std) and the model's ``pretrained_cfg`` are written to the ONNX file's
``metadata_props`` (to the ``.pt2`` archive as ``extra/posthoc.json``) and to a JSON file beside it
(``model.onnx`` + ``model.json``).

``aoti`` compiles the same program ahead of time with AOTInductor (``torch._inductor.
aoti_compile_and_package``) for the exporting machine's device, CPU here, into a package that
``torch._inductor.aoti_load_package`` runs without Python model code; it needs a C++ compiler and takes
tens of seconds even for small models.

Validation: before anything is put in place, the written file is run (ONNX Runtime on CPU,
``torch.export.load(...).module()``, or the loaded AOTInductor package) on generated batches of 1, 2 and 7 images and compared with the
loaded artifact; a difference in probabilities above ``tolerance`` (1e-4) fails with one line and
writes nothing. A model that cannot be exported fails with one line naming the layer (and operator).
Files are written to a temporary sibling directory and renamed into place.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import PosthocError, first_line
from .fused import EnsembleModule
from .paths import check_input_file, read_json_file

FORMATS = ("onnx", "pt2", "aoti")
TOLERANCE = 1e-4
VALIDATION_BATCHES = (1, 2, 7)
INPUT_NAME = "images"
OUTPUT_NAMES = ("probs", "member_probs")
PREPROCESSING_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
INSTALL_HINT = "pip install 'posthoc[export]'"


class ExportableEnsemble(nn.Module):
    """An :class:`EnsembleModule` as a function of the image batch alone, for tracing.

    ``forward(images)`` returns ``(probs,)`` or ``(probs, member_probs)``: the ensemble module's own
    ``forward`` with members run one after another (strategy ``loop``; the ``threads`` and ``vmap``
    paths do not trace with a dynamic batch). The ensemble module is shared, not copied: only its
    strategy is set, on a shallow copy that shares every submodule and tensor.
    """

    def __init__(self, ensemble: EnsembleModule, members_output: bool = False):
        super().__init__()
        ensemble = copy.copy(ensemble)  # shares submodules and tensors; the caller's strategy is untouched
        ensemble.strategy = "loop"
        self.ensemble = ensemble
        self.members_output = members_output
        self.prepare()

    def prepare(self) -> None:
        """Build the executors' per-member modules now (lazily built, they cannot be built under tracing) and
        register them, so that their tensors (views of the stacked member tensors) are exported as the
        program's parameters, stored once with the stacks, rather than as a second copy of constants."""
        copies = [m for ex in self.ensemble.executors if ex.member_tensors() for m in ex.member_modules()]
        self.member_copies = nn.ModuleList(copies)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.ensemble(images, return_members=self.members_output)
        return tuple(out) if self.members_output else (out,)


def readmetadata(path: str | Path) -> dict[str, Any]:
    """The JSON beside an exported file (``model.onnx`` -> ``model.json``), checked to be posthoc's."""
    file = Path(path).with_suffix(".json")
    data = read_json_file(file, "export metadata", "export it again with posthoc export")
    if not isinstance(data, dict) or data.get("exported_by") != "posthoc":
        raise PosthocError(f"{file} is not the metadata of a posthoc export")
    return data


def export_files(path: str | Path, artifact_path: str | Path | None = None) -> dict[str, Path]:
    """The files of the export ``path`` by name, to upload beside an artifact (``posthoc push --with-export``):
    the graph, its metadata JSON and, for an ONNX graph over 2 GB, its weights (``FILE.data``).

    With ``artifact_path``, the export must have been made from that artifact (the SHA-256 of its weights,
    recorded at export, must match), so a stale export is never published beside a newer artifact.
    """
    from .artifact import WEIGHTS, read_config

    path = check_input_file(path, "export", f"write it with posthoc export ARTIFACT --out {path}")
    metadata = readmetadata(path)
    if artifact_path is not None:
        expected = read_config(artifact_path).get("files", {}).get(WEIGHTS, {}).get("sha256")
        recorded = (metadata.get("artifact") or {}).get("sha256")
        if expected and recorded != expected:
            raise PosthocError(
                f"{path} was not exported from {artifact_path} (its weights differ); export it again with "
                f"posthoc export {artifact_path} --out {path} --overwrite"
            )
    files = {path.name: path, path.with_suffix(".json").name: path.with_suffix(".json")}
    data = path.with_name(path.name + ".data")
    if data.is_file():
        files[data.name] = data
    return files


# ------------------------------------------------------------------------------------- internals
def require(format: str, validate: bool) -> None:
    """The optional packages a format needs, or one line saying how to install them."""
    needed = ["onnx", "onnxscript"] + (["onnxruntime"] if validate else []) if format == "onnx" else []
    for package in needed:
        try:
            __import__(package)
        except ImportError:
            raise PosthocError(f"exporting to ONNX needs {package}, which is not installed: {INSTALL_HINT}") from None


def metadata(
    module: EnsembleModule, format: str, out: Path, data_config: dict, outputs: list[str], opset: int | None, dtype: torch.dtype
) -> dict[str, Any]:
    """What the JSON beside the file (and the ONNX metadata) records."""
    import timm

    from . import __version__

    def plain(value: Any) -> Any:
        return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))

    n, k, c = "batch", module.num_members, module.num_classes
    shapes = {"probs": [n, c], "member_probs": [k, n, c]}
    config = getattr(module, "posthoc_config", {}) or {}
    return {
        "exported_by": "posthoc",
        "format": format,
        "file": out.name,
        "input": {"name": INPUT_NAME, "shape": [n, *data_config["input_size"]], "dtype": str(dtype).removeprefix("torch.")},
        "outputs": {name: shapes[name] for name in outputs},
        "preprocessing": plain({key: data_config.get(key) for key in PREPROCESSING_KEYS}),
        "pretrained_cfg": plain(module.pretrained_cfg),
        "num_classes": c,
        "num_members": k,
        "member_names": list(module.member_names),
        "combine": {"rule": module.rule, "temperature": module.temperature, "views": list(module.views)},
        "artifact": {
            "name": str(getattr(module, "posthoc_name", "")),
            "sha256": config.get("files", {}).get("model.safetensors", {}).get("sha256"),
        },
        "opset": opset,
        "versions": {"posthoc": __version__, "torch": torch.__version__, "timm": timm.__version__},
    }


def trace(wrapper: ExportableEnsemble, example: torch.Tensor, names: dict[int, str], source: str):
    """``torch.export`` with a dynamic batch; a failure becomes one line naming the layer."""
    batch = torch.export.Dim("batch", min=1)
    wrapper.prepare()
    try:
        with torch.no_grad(), _quiet_torch_logs():
            return torch.export.export(wrapper, (example,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as e:
        where = _failing_layer(e, names) or "the model"
        raise PosthocError(f"cannot export {source}: {where} does not trace with torch.export ({_reason(e)})") from None


def save_onnx(program, target: Path, metadata: dict, opset: int | None, source: str) -> None:
    """Convert the traced program to ONNX, record the metadata in the file, save it."""
    import warnings

    kwargs = {"opset_version": opset} if opset is not None else {}
    try:
        with warnings.catch_warnings(), _quiet_torch_logs():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(
                program,
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=list(metadata["outputs"]),
                verbose=False,
                **kwargs,
            )
    except Exception as e:
        node, operator = _failing_node(e, program)
        if operator is None:
            raise PosthocError(f"cannot export {source} to ONNX: {_reason(e)}") from None
        layer = _node_layer(node) if node is not None else None
        where = f" in {layer}" if layer else ""
        raise PosthocError(
            f"cannot export {source} to ONNX: operator {operator}{where} has no ONNX translation "
            f"(opset {opset or 'default'}); export it with --format pt2, or replace that layer"
        ) from None
    model = onnx_program.model
    _name_batch_dimension(model)
    metadata["opset"] = model.opset_imports.get("", opset)
    if opset is not None and metadata["opset"] != opset:
        raise PosthocError(
            f"torch's ONNX exporter cannot write {source} in opset {opset} (it wrote opset {metadata['opset']}); "
            "choose --opset 18 or higher, or leave it out"
        )
    for key, value in _onnxmetadata(metadata).items():
        model.metadata_props[key] = value
    onnx_program.save(str(target))  # over 2 GB, the weights go to TARGET.data beside it


def _name_batch_dimension(model) -> None:
    """Call the input's dynamic dimension ``batch`` (the exporter names it after its symbol, e.g. ``s34``)."""
    import onnx_ir as ir

    first = model.graph.inputs[0].shape[0]
    if not isinstance(first, ir.SymbolicDim) or first.value is None:
        return
    symbol = first.value
    values = [*model.graph.inputs, *model.graph.outputs, *(v for node in model.graph for v in node.outputs)]
    for value in values:
        dims = list(value.shape or [])
        if any(isinstance(d, ir.SymbolicDim) and d.value == symbol for d in dims):
            value.shape = ir.Shape(
                [ir.SymbolicDim("batch") if isinstance(d, ir.SymbolicDim) and d.value == symbol else d for d in dims]
            )


def _onnxmetadata(metadata: dict[str, Any]) -> dict[str, str]:
    """``metadata_props`` entries: the preprocessing keys one by one, and the whole record as ``posthoc``."""
    props = {key: json.dumps(value) for key, value in metadata["preprocessing"].items()}
    props.update(
        {
            "pretrained_cfg": json.dumps(metadata["pretrained_cfg"]),
            "num_classes": str(metadata["num_classes"]),
            "num_members": str(metadata["num_members"]),
            "combine_rule": metadata["combine"]["rule"],
            "temperature": repr(metadata["combine"]["temperature"]),
            "outputs": ",".join(metadata["outputs"]),
            "posthoc": json.dumps(metadata),
        }
    )
    return props


def save_pt2(program, target: Path, metadata: dict) -> None:
    """``torch.export.save`` with the metadata as ``extra/posthoc.json`` in the archive."""
    import warnings

    with warnings.catch_warnings():
        # channels-last member stacks are not 'complete' tensors to its check; on CPU their whole storage is
        # written, which is correct (the warning concerns weights on a GPU, and export runs on CPU)
        warnings.filterwarnings("ignore", message="No complete tensor found in the group")
        torch.export.save(program, str(target), extra_files={"posthoc.json": json.dumps(metadata)})


def save_aoti(program, target: Path, source: str) -> None:
    """An AOTInductor package: the program compiled ahead of time for this machine's device (CPU here)."""
    try:
        with _quiet_torch_logs():
            torch._inductor.aoti_compile_and_package(program, package_path=str(target))
    except Exception as e:
        raise PosthocError(f"AOTInductor cannot compile {source} ({_reason(e)}); export it with --format pt2 instead") from None


def _run_exported(target: Path, format: str) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """A function running the written file on a CPU batch: ONNX Runtime, or the reloaded program."""
    if format == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
        return lambda x: [torch.from_numpy(o) for o in session.run(None, {INPUT_NAME: x.numpy()})]
    if format == "aoti":
        compiled = torch._inductor.aoti_load_package(str(target))
        return lambda x: list(compiled(x))
    program = torch.export.load(str(target)).module()

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return list(program(x))

    return run


def validate(
    module, target: Path, format: str, shape: tuple, dtype: torch.dtype, members_output: bool, tolerance: float
) -> float:
    """Max abs difference between the written file and the loaded artifact on generated batches."""
    try:
        run = _run_exported(target, format)
    except Exception as e:
        raise PosthocError(f"the exported {format} file does not load ({_reason(e)}); nothing was written") from None
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch in VALIDATION_BATCHES:
        x = torch.randn(batch, *shape, generator=generator).to(dtype)
        with torch.no_grad():
            expected = module(x, return_members=True)[: 2 if members_output else 1]
        try:
            got = run(x)
        except Exception as e:
            raise PosthocError(
                f"the exported {format} file fails on a batch of {batch} ({_reason(e)}); nothing was written"
            ) from None
        for name, a, b in zip(OUTPUT_NAMES, got, expected):
            if tuple(a.shape) != tuple(b.shape):
                raise PosthocError(
                    f"the exported {name} has shape {tuple(a.shape)} on a batch of {batch}, expected {tuple(b.shape)}; nothing was written"
                )
            worst = max(worst, float((a.float() - b.float()).abs().max()))
    if not worst <= tolerance:
        raise PosthocError(
            f"the exported {format} file differs from posthoc.load by {worst:.2e} in probability (tolerance {tolerance:g}); "
            "nothing was written (pass --no-validate to write it anyway)"
        )
    return worst


def layer_names(wrapper: ExportableEnsemble) -> dict[int, str]:
    """A readable name for every module the traced forward may run, by the id of the module's ``__dict__``:
    the model's own layer names (without the executor plumbing), with the member for the per-member copies
    and the group for mixed architectures."""
    ensemble = wrapper.ensemble
    many = len(ensemble.executors) > 1
    names: dict[int, str] = {}

    def add(module: nn.Module, suffix: str) -> None:
        for path, sub in module.named_modules():
            if path:  # the executor's own wrappers are not layers
                what = "the network" if path == "model" else f"layer '{path.removeprefix('model.')}'"
                names.setdefault(id(sub.__dict__), f"{what} ({type(sub).__name__}{suffix})")

    for g, executor in enumerate(ensemble.executors):
        arch = f", {type(executor.net.model).__name__} group {g}" if many else ""
        offset = sum(ex.num_members for ex in ensemble.executors[:g])
        for k, member in enumerate(executor._members or []):
            add(member, f", member {ensemble.member_names[offset + k]}{arch}")
        for part in (executor.prefix, executor.suffix, executor.net):
            if part is not None:
                add(part, arch)
    if ensemble.coupling is not None:
        names[id(ensemble.coupling.__dict__)] = "the coupling layer (Linear)"
    return names


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Torch's tracing loggers at ERROR and stderr captured for the duration: a failed trace logs and prints
    whole graphs, while posthoc reports the failure in one line."""
    loggers = [logging.getLogger(name) for name in ("torch", "onnxscript", "onnx_ir")]
    loggers += [
        logger
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger) and name.startswith(("torch.", "onnxscript.", "onnx_ir."))
    ]
    saved = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.level, logging.ERROR))
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, saved):
            logger.setLevel(level)


def _frames(e: BaseException) -> Iterator[Any]:
    """Every traceback frame of an exception and of the exceptions it was raised from, outermost first."""
    seen: set[int] = set()
    chain: list[BaseException] = []
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for exc in reversed(chain):
        tb = exc.__traceback__
        while tb is not None:
            yield tb.tb_frame
            tb = tb.tb_next


def _failing_layer(e: BaseException, names: dict[int, str]) -> str | None:
    """The innermost layer whose ``forward`` was running when tracing failed (non-strict export runs the
    Python code; its tracer may call a module through a proxy sharing the module's ``__dict__``)."""
    layer = None
    for frame in _frames(e):
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module):
            key = id(owner.__dict__)
            layer = names.get(key, layer)
    return layer


def _failing_node(e: BaseException, program) -> tuple[Any, str | None]:
    """The graph node (and its operator) the ONNX translation stopped at, read from the exporter's message."""
    text = ""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text += "\n" + str(e)
        e = e.__cause__ or e.__context__
    nodes = {n.name: n for n in program.graph.nodes}
    match = re.search(r"translating node %(\w+)", text)
    node = nodes.get(match.group(1)) if match else None
    if node is not None:
        return node, _operator(node.target)
    match = re.search(r"OpOverload\(op='([\w.]+)', overload='(\w+)'\)", text)
    if match:
        operator = f"{match.group(1)}.{match.group(2)}"
        node = next((n for n in program.graph.nodes if n.op == "call_function" and _operator(n.target) == operator), None)
        return node, operator
    return None, None


def _operator(target: Any) -> str:
    name = getattr(target, "name", None)
    return name() if callable(name) else str(target)


def _node_layer(node) -> str | None:
    """The layer a traced node came from: its innermost ``nn_module_stack`` entry, a path in the traced network."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, kind = list(stack.values())[-1]
    what = "the network" if path == "model" else f"layer '{path.removeprefix('model.')}'"
    return f"{what} ({str(kind).rsplit('.', 1)[-1]})" if path else None


def _reason(e: BaseException) -> str:
    """The most specific one-line cause of an export failure."""
    text = str(e)
    for pattern in (
        r"No ONNX function found for [^\n]+",
        r"Could not guard on data-dependent expression .+?(?= \(unhinted|$)",
        r"Could not extract specialized integer from data-dependent expression .+?(?= \(unhinted|$)",
    ):
        match = re.search(pattern, text)
        if match:
            return match.group(0).strip().rstrip(".")
    cause = e.__cause__ or e.__context__
    line = first_line(cause if cause is not None and len(str(e)) > 300 else e)
    return line[:200]
