"""``posthoc push``: publish an artifact on the Hugging Face Hub with its model card, in one commit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..artifact import CARD, CONFIG, FILES, WEIGHTS, read
from ..card import render_card
from ..command_options import PUSH, PushOptions
from ..errors import PosthocError
from ..export import export_files
from ..hub import commit, hub_spec, split_repo
from ..options import REQUIRED


def push(path: str | Path, repo: str = REQUIRED, *, endpoint: str | None = None, warn=None, **options: Any) -> str:
    """Upload the artifact in ``path`` to a Hub model repository (created when absent) in one commit; return its URL.

    The weights are checked against the SHA-256 in ``config.json`` first, so a damaged artifact is never
    published. The model card is rendered again with ``hf-hub:REPO`` in its usage lines; ``with_export``
    uploads a ``posthoc export`` of the artifact beside it (refused when it was exported from other weights),
    and the card shows how to run it. ``options``:
    :class:`PushOptions` (``commit_message`` is accepted for ``message``).
    """
    if "commit_message" in options:
        options["message"] = options.pop("commit_message")
    groups, rest = PUSH.split({**options, "repo": repo}, warn=warn)
    if rest:
        raise PosthocError(f"unknown option {', '.join(sorted(rest))}")
    opts = groups[PushOptions]
    path = Path(path)
    repo_id, rev = split_repo(opts.repo)
    if rev is not None:
        raise PosthocError(f"give the branch with --revision, not in the repository id '{opts.repo}'")
    extra = export_files(opts.with_export, path) if opts.with_export is not None else {}
    for name, file in extra.items():
        if name in FILES:
            raise PosthocError(f"an extra file cannot be named {name}, the artifact's own {name}; rename {file}")
    _, config = read(path)  # validates config.json and the weights' size and SHA-256
    onnx_file = next((name for name in extra if name.endswith(".onnx")), None)
    card = render_card(config, load_path=hub_spec(repo_id, None if opts.create_pr else opts.revision), onnx_file=onnx_file)
    files = {CONFIG: str(path / CONFIG), WEIGHTS: str(path / WEIGHTS), CARD: card.encode()}
    files.update({name: str(file) for name, file in extra.items()})
    message = opts.message or f"Upload {config['method']['name']} ensemble ({config['num_members']} members) with posthoc"
    return commit(
        repo_id,
        files,
        message=message,
        private=opts.private,
        revision=opts.revision,
        create_pr=opts.create_pr,
        token=opts.token,
        endpoint=endpoint,
    )
