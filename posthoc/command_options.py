"""Every command's declared options: its own option set and the shared groups it takes (:mod:`posthoc.options`).

Kept apart from the commands so that the command line can build every command's flags (and ``posthoc
--help`` can start) without importing torch; each command's Python function splits its keyword arguments
with the same declaration (:meth:`~posthoc.options.CommandOptions.split`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .errors import PosthocError
from .options import (
    REQUIRED,
    SEED,
    CommandOptions,
    DataOptions,
    LoaderOptions,
    ModelOptions,
    Options,
    OutputOptions,
    PreprocessingOptions,
    Renamed,
    ViewOptions,
    option,
)
from .paths import check_input_file

STORAGE_DTYPES = ("auto", "float32", "float16", "bfloat16")
SCHEDULES = ("onecycle", "cosine", "constant")
OPTIMIZERS = ("auto", "sgd", "adamw")  # auto: posthoc.training.optimizer_family (SGD for BatchNorm networks, else AdamW)
MODEL_DTYPES = ("float32", "float16", "bfloat16")
RESULT_SUFFIXES = (".json", ".csv")
SORT_FIELDS = (  # the numeric fields of an eval row
    "top1",
    "top1_err",
    "top5",
    "top5_err",
    "nll",
    "ece",
    "brier",
    "param_count",
    "throughput",
    "images",
    "img_size",
    "crop_pct",
    "members",
    "member_top1",
    "disagreement",
    "top1_original",
    "real_images",
    "skipped_images",
    "tuned_images",
)


# ---------------------------------------------------------------------------------------- boost
@dataclass
class BoostOptions(Options):
    """What boost does besides the method."""

    panel: ClassVar[str] = "Boost"

    renamed: ClassVar[dict[str, Renamed]] = {"dtype": Renamed("storage_dtype")}

    temperature_scaling: bool = option(True, "Fit one temperature on the select part as the last step (stored in the artifact).")
    inference_budget: float | None = option(
        None,
        "Most forward FLOPs per image the artifact may cost, in parent forward passes (e.g. 1.5); the method chooses its "
        "members and their shared part to fit. Options given explicitly override it.",
        ge=1,
        metavar="X",
    )
    distill: bool = option(
        False, "Distil the artifact into one network as the last step (written to --out; the ensemble to OUT-teacher)."
    )
    distill_epochs: float = option(1.0, "Epochs of distillation with --distill.", gt=0, metavar="EPOCHS")
    storage_dtype: str = option(
        "auto", "Dtype of the stored weights: auto (the parent checkpoint's), float32, float16, bfloat16.", choices=STORAGE_DTYPES
    )
    amp: bool = option(False, "Mixed precision in training loops (float16 + grad scaler on CUDA, bfloat16 on CPU).")


BOOST = CommandOptions(
    groups=(DataOptions, PreprocessingOptions, ModelOptions, LoaderOptions, OutputOptions, ViewOptions, BoostOptions),
    exclude=frozenset({"batch_size"}),  # a method option where the method trains
)


# ------------------------------------------------------------------------------------- ensemble
@dataclass
class EnsembleOptions(Options):
    """How the members are combined and stored."""

    panel: ClassVar[str] = "Ensemble"

    renamed: ClassVar[dict[str, Renamed]] = {"dtype": Renamed("storage_dtype")}

    combine: str = option(
        "prob_mean",
        "prob_mean, logit_mean or vote (coupling needs training: boost --method supernet).",
        choices=("prob_mean", "logit_mean", "vote", "coupling"),
    )
    storage_dtype: str = option(
        "auto", "Dtype of the stored weights: auto (the checkpoints'), float32, float16, bfloat16.", choices=STORAGE_DTYPES
    )


ENSEMBLE = CommandOptions(
    groups=(EnsembleOptions, ModelOptions, OutputOptions),
    exclude=frozenset({"num_classes", "progress"}),
    defaults=(("out", REQUIRED),),
)


# ----------------------------------------------------------------------------------------- eval
@dataclass
class EvalOptions(Options):
    """What to score and how."""

    panel: ClassVar[str] = "Evaluation"

    renamed: ClassVar[dict[str, Renamed]] = {"dtype": Renamed("model_dtype")}

    split: str = option("val", "Split folder, optionally with a part: val, val:select, val:report.", metavar="SPLIT")
    model_list: Path | None = option(None, "A file of model specs, one per line, # comments.", metavar="FILE", role="input")
    model_dtype: str = option("float32", "Inference dtype of the model (timm's --model-dtype).", choices=MODEL_DTYPES)
    amp: bool = option(False, "Mixed precision (float16 on CUDA, bfloat16 on CPU).")
    channels_last: bool | None = option(None, "Channels-last inputs and weights (default: on CUDA).")
    compile: bool = option(False, "torch.compile the model before evaluating.")
    results_file: Path | None = option(
        None, "Write a row per model to .json or .csv, as each finishes.", metavar="FILE", role="output"
    )
    sort: str | None = option(None, "Sort the rows by this field, descending (e.g. top1).", choices=SORT_FIELDS, metavar="FIELD")
    valid_labels: Path | None = option(
        None, "The model's class indices the data's classes are, one per line (ImageNet-A/R).", metavar="FILE", role="input"
    )
    real_labels: Path | None = option(
        None, "ImageNet-ReaL real.json: top-1/top-5 count any label of an image's set.", metavar="FILE", role="input"
    )

    def validate(self) -> None:
        if self.results_file is not None and Path(self.results_file).suffix.lower() not in RESULT_SUFFIXES:
            raise PosthocError(f"--results-file must end in {' or '.join(RESULT_SUFFIXES)}, got '{Path(self.results_file).name}'")
        for flag, path in (("--valid-labels", self.valid_labels), ("--real-labels", self.real_labels)):
            if path is not None:
                check_input_file(path, f"{flag} file")
        if self.valid_labels is not None and self.real_labels is not None:
            raise PosthocError(
                "--real-labels index the model's full label space and --valid-labels a subset of it; give one of them"
            )


EVAL = CommandOptions(
    groups=(EvalOptions, ModelOptions, DataOptions, PreprocessingOptions, LoaderOptions, OutputOptions, ViewOptions),
    exclude=frozenset({"train_split", "val_split", "out", "overwrite"}),
    defaults=(("tta", None),),  # an artifact's own views; none or flip override them for the run
)


# ------------------------------------------------------------------------------------ calibrate
@dataclass
class CalibrateOptions(Options):
    """The temperature."""

    panel: ClassVar[str] = "Calibration"

    temperature: str = option(
        "on",
        "on: fit one temperature on the select part; auto: keep it only where it lowers the two-fold cross-validated "
        "select NLL (boost's rule); off: none.",
        choices=("on", "auto", "off"),
    )


CALIBRATE = CommandOptions(
    groups=(CalibrateOptions, DataOptions, PreprocessingOptions, ModelOptions, LoaderOptions, OutputOptions, ViewOptions),
    exclude=frozenset({"train_split", "num_classes", "batch_size", "progress"}),
    defaults=(("out", REQUIRED),),
)


# -------------------------------------------------------------------------------------- distill
@dataclass
class DistillConfig(Options):
    """How the student learns (``posthoc distill``'s options; ``boost --distill`` uses the same)."""

    panel: ClassVar[str] = "Distillation"

    epochs: float = option(1.0, "Epochs over the training split (fractions allowed).", gt=0, metavar="EPOCHS")
    temperature: float = option(4.0, "Softening temperature of teacher and student.", gt=0, metavar="T")
    alpha: float | None = option(None, "Weight of the distillation term (default 0.9; 1.0 with --consensus).", ge=0, metavar="A")
    consensus: bool = option(False, "Collaborative loss: cross-entropy + alpha x symmetric CE to the ensemble.")
    cache_teacher: bool = option(False, "One teacher pass over a fixed augmented view of every image.")
    mixup: float = option(
        0.0, "Beta(A, A) mixup of each batch, the teacher scoring the mixed images (0: off).", ge=0, metavar="A"
    )
    schedule: str = option("onecycle", "Learning rate schedule: onecycle, cosine or constant.", choices=SCHEDULES)
    optimizer: str = option(
        "auto", "Optimizer: auto (SGD Nesterov for a BatchNorm student, AdamW for any other), sgd or adamw.", choices=OPTIMIZERS
    )
    max_lr: float | None = option(None, "Peak learning rate (default: 0.02 with SGD, 0.0001 with AdamW).", gt=0, metavar="LR")
    weight_decay: float | None = option(
        None, "Weight decay (default: 0.0005 with SGD, 0.05 with AdamW, decoupled).", ge=0, metavar="WD"
    )
    batch_size: int = option(128, "Training batch size.", ge=1, short="-b", metavar="N")
    augment: str = option(
        "light", "Training augmentation: light (pad-crop + flip), timm, or none.", choices=("light", "timm", "none")
    )
    seed: int = option(0, "Random seed; the same seed gives the same student.", **SEED)

    def __post_init__(self) -> None:
        if self.alpha is None:
            self.alpha = 1.0 if self.consensus else 0.9
        super().__post_init__()

    def validate(self) -> None:
        if not self.consensus and self.alpha > 1:
            raise PosthocError(f"--alpha must be in [0, 1] for distillation (any >= 0 with --consensus), got {self.alpha}")
        if self.mixup and self.cache_teacher:
            raise PosthocError("--mixup shows the teacher new mixed images every step; drop --cache-teacher")


@dataclass
class StudentOptions(Options):
    """Which network learns, and its last step."""

    panel: ClassVar[str] = "Student"

    student: str | None = option(None, "Model to train (default: the artifact's parent).", metavar="SPEC")
    temperature_scaling: bool = option(True, "Calibrate the student on the select part.")
    teacher_tta: str = option(
        "auto",
        "Test-time views of the teacher's targets: auto (the mirror where it lowers the teacher's cross-validated "
        "select NLL), none, flip, or stored (the artifact's own). The student stays one network seeing one view.",
        choices=("auto", "none", "flip", "stored"),
    )


DISTILL = CommandOptions(
    groups=(DistillConfig, StudentOptions, DataOptions, LoaderOptions, OutputOptions),
    exclude=frozenset({"LoaderOptions.batch_size"}),
    defaults=(("out", REQUIRED),),
)


# ----------------------------------------------------------------------------------------- push
@dataclass
class PushOptions(Options):
    """Where the artifact goes on the Hub."""

    panel: ClassVar[str] = "Hub"

    renamed: ClassVar[dict[str, Renamed]] = {"m": Renamed("message", spelling="-m")}

    repo: str = option(REQUIRED, "Hub model repository, org/name (created if absent).", metavar="ORG/NAME")
    private: bool | None = option(None, "Make a new repository private, or public (the default).", off_flag="--public")
    revision: str | None = option(None, "Branch to commit to (created if absent).", metavar="BRANCH")
    create_pr: bool = option(False, "Open a pull request instead of committing.")
    message: str | None = option(None, "Commit message.", metavar="TEXT")
    token: str | None = option(None, "Hub token (default: hf auth login / HF_TOKEN).", metavar="TOKEN")
    with_export: Path | None = option(
        None,
        "Also upload this file of posthoc export (with its JSON); the card shows how to run it.",
        metavar="FILE",
        role="input",
    )


PUSH = CommandOptions(groups=(PushOptions,))


# --------------------------------------------------------------------------------------- export
@dataclass
class ExportOptions(Options):
    """What the exported file holds."""

    panel: ClassVar[str] = "Export"

    format: str | None = option(
        None,
        "onnx, pt2 (torch.export) or aoti (AOTInductor, compiled for CPU); default: pt2 for a .pt2 --out, else onnx.",
        choices=("onnx", "pt2", "aoti"),
    )
    members_output: bool = option(False, "Also output each member's probabilities (K, N, classes).")
    opset: int | None = option(None, "ONNX opset (default: torch's).", ge=1, metavar="N")
    validate: bool = option(True, "Compare the file with posthoc.load on generated batches before writing it.")


EXPORT = CommandOptions(
    groups=(ExportOptions, OutputOptions),
    exclude=frozenset({"progress"}),
    defaults=(("out", REQUIRED),),
)
