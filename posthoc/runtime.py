"""Devices, dtypes, seeds and progress bars shared by every command."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch

from . import distributed
from .errors import PosthocError, first_line

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
T = TypeVar("T")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; asking for CUDA without one is an error.

    With several processes (:mod:`posthoc.distributed`) each takes its own GPU: ``cuda`` (and ``auto``)
    mean ``cuda:LOCAL_RANK``.
    """
    name = (name or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PosthocError("CUDA was requested (--device cuda) but no CUDA GPU is available; use --device cpu")
        if distributed.world_size() > 1:
            if name != "cuda":
                raise PosthocError(
                    f"--device {name} would put all {distributed.world_size()} processes on one GPU; use --device cuda "
                    "(each process takes cuda:LOCAL_RANK)"
                )
            return torch.device("cuda", distributed.local_rank())
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise PosthocError(f"unknown device '{name}'; use auto, cpu or cuda")


def resolve_dtype(name: str = "float32") -> torch.dtype:
    """``float32`` | ``float16`` | ``bfloat16`` as a torch dtype."""
    try:
        return DTYPES[name]
    except KeyError:
        raise PosthocError(f"unknown dtype '{name}'; use {', '.join(DTYPES)}") from None


def autocast(device: torch.device, enabled: bool):
    """Mixed precision for inference: float16 on CUDA, bfloat16 on CPU; a no-op when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def derive_seed(seed: int, index: int) -> int:
    """A seed for the ``index``-th independent stream of a run seeded with ``seed`` (draws, epochs, members)."""
    return seed * 1_000_003 + index


def seeded_generator(seed: int, index: int | None = None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or with :func:`derive_seed` ``(seed, index)`` for one stream of a run.

    Every random draw in posthoc goes through a generator made here, so the same seed gives the same
    artifact on any device.
    """
    return torch.Generator().manual_seed(seed if index is None else derive_seed(seed, index))


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (CPU and CUDA)."""
    random.seed(seed)
    torch.manual_seed(seed)


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work (timing); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def progress(iterable: Iterable[T], total: int | None = None, description: str = "", enabled: bool = True) -> Iterator[T]:
    """A rich progress bar over ``iterable`` (silent when ``enabled`` is false, and on every process but rank 0)."""
    if not enabled or not distributed.is_main():
        yield from iterable
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in iterable:
            yield item
            bar.advance(task)


@contextlib.contextmanager
def model_errors(what: str, inputs: torch.Tensor | None = None) -> Iterator[None]:
    """A forward pass that cannot run on these inputs (too small for the architecture, a fixed input size,
    channels it does not take, memory it cannot get) becomes one line naming ``what`` and the input shape."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise PosthocError(f"{what} ran out of memory on a batch; lower --batch-size or --img-size") from None
    except (RuntimeError, AssertionError, ValueError, IndexError) as e:
        if "more than 1 value per channel" in str(e):
            raise PosthocError(
                f"{what}: a batch of one image cannot train a model with BatchNorm; use --batch-size 2 or more"
            ) from None
        shape = "x".join(map(str, inputs.shape[1:])) if inputs is not None and inputs.dim() > 1 else "these inputs"
        raise PosthocError(
            f"{what} cannot run on inputs of {shape} ({first_line(e)[:200]}); check --img-size and the model's preprocessing"
        ) from None
