"""``posthoc info``: what an artifact holds, read from its ``config.json`` after its weights are checked."""

from __future__ import annotations

from ..artifact import read
from ..card import summarize
from ..paths import size_mb
from ..sources import artifact_dir


def info(spec: str) -> list[tuple[str, str]]:
    """``(label, text)`` rows describing the artifact ``spec`` (a directory or ``hf-hub:org/name``): members,
    combine rule, what is shared, sizes, cost, versions, hyper-parameters and stored metrics."""
    path = artifact_dir(spec)
    _, config = read(path)  # checks the weights against the recorded size and SHA-256
    return summarize(config, size_mb(path))
