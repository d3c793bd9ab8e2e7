"""Results files of ``posthoc eval``: ``.json`` (every field) or ``.csv`` (scalar fields), one row per model,
written atomically; undefined values are ``null`` / empty, never ``NaN``."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from . import distributed
from .command_options import RESULT_SUFFIXES
from .errors import PosthocError
from .paths import write_text_atomically


def write_results(results: dict[str, Any] | list[dict[str, Any]], path: str | Path) -> None:
    """Write results to ``.json`` (all fields; one object, or a list for several models) or ``.csv`` (scalar
    fields, one row per model), atomically. Missing or undefined values are ``null`` / empty, never ``NaN``.
    With several processes only rank 0 writes."""
    if not distributed.is_main():  # with several processes, rank 0 writes
        return
    path = Path(path)
    rows = results if isinstance(results, list) else [results]
    if path.suffix.lower() not in RESULT_SUFFIXES:
        raise PosthocError(f"--results-file must end in {' or '.join(RESULT_SUFFIXES)}, got '{path.name}'")
    if path.suffix.lower() == ".csv":
        scalars = [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in rows]
        fields = list(dict.fromkeys(k for r in scalars for k in r))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(scalars)
        text = buffer.getvalue()
    else:
        text = json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n"
    write_text_atomically(path, text, "results file")


def is_results_file(path: str | Path) -> bool:
    """True when ``path`` holds what :func:`write_results` writes (rows naming their ``model``), so that a run
    rewrites its own results file but never a user's file of the same name."""
    path = Path(path)
    try:
        if path.stat().st_size > 256 << 20:
            return False
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if not text.strip():
        return True  # an empty file holds nothing to lose
    if path.suffix.lower() == ".csv":
        return text.split("\n", 1)[0].split(",", 1)[0].strip() == "model"
    try:
        rows = json.loads(text)
    except ValueError:
        return False
    rows = rows if isinstance(rows, list) else [rows]
    return bool(rows) and all(isinstance(r, dict) and "model" in r for r in rows)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
