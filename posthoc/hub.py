"""The Hugging Face Hub: repository ids, downloads through the cache, one-commit uploads, and errors.

This module only speaks to the Hub (through huggingface_hub): it knows nothing of artifacts or model
specs. Downloads go through huggingface_hub's cache, so ``HF_HUB_OFFLINE=1`` works once a repository
is cached. Before the first request, :func:`prepare` checks that the Hub answers a TCP connection within
a few seconds; when it does not, the process works from the cache alone (as with ``HF_HUB_OFFLINE=1``),
so a missing file fails at once rather than after a minute of retries. Every huggingface_hub failure
becomes one :class:`PosthocError` line that says what to do.
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import PosthocError, first_line

CONNECT_TIMEOUT = 3.0  # seconds the Hub gets to answer before posthoc works from the cache alone
_unreachable: str | None = None  # the endpoint that did not answer, once prepare() found it so


def prepare() -> None:
    """Before talking to the Hub: if it does not accept a connection within ``CONNECT_TIMEOUT`` seconds,
    switch this process to offline mode (cached files only, no retries)."""
    global _unreachable
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or _unreachable is not None:
        return
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except OSError:
        _unreachable = constants.ENDPOINT
        constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"


_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9])?")


def split_repo(spec: str) -> tuple[str, str | None]:
    """``hf-hub:org/name@rev`` (or ``org/name``) -> (``org/name``, ``rev`` or None), as timm's ``hf_split``;
    an id the Hub would not accept (``..``, other separators, odd characters) is one line, never a path."""
    repo = spec.split(":", 1)[1] if is_hub_spec(spec) else spec
    repo, _, revision = repo.partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(_REPO_PART.fullmatch(p) and ".." not in p and "--" not in p for p in parts):
        raise PosthocError(f"'{spec}' is not a Hub repository id; write it as org/name (hf-hub:org/name to load)")
    if revision and (".." in revision or not revision.isprintable() or revision.startswith("/")):
        raise PosthocError(f"'{revision}' in '{spec}' is not a Hub revision; give a branch, tag or commit")
    return repo, revision or None


def is_hub_spec(spec: str) -> bool:
    """True for ``hf-hub:org/name[@rev]`` (timm's prefix; ``hf_hub:`` too)."""
    return spec.startswith(("hf-hub:", "hf_hub:"))


def hub_spec(repo_id: str, revision: str | None = None) -> str:
    """The model spec that loads ``repo_id`` (at ``revision``): ``hf-hub:org/name[@rev]``."""
    return f"hf-hub:{repo_id}" + (f"@{revision}" if revision else "")


def hub_config(repo: str, revision: str | None = None) -> dict[str, Any]:
    """A Hub repository's ``config.json`` (downloaded, or read from the cache; fetched once per process)."""
    try:
        config = json.loads(_config_text(repo, revision))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PosthocError(f"config.json of Hub repository '{repo}' is not valid JSON ({first_line(e)})") from e
    return config if isinstance(config, dict) else {}


@functools.lru_cache(maxsize=32)
def _config_text(repo: str, revision: str | None) -> str:
    from huggingface_hub import hf_hub_download

    with hub_errors(repo):
        prepare()
        return Path(hf_hub_download(repo, "config.json", revision=revision)).read_text()


def download(repo: str, revision: str | None, files: list[str]) -> Path:
    """Download ``files`` of a Hub repository (or find them in the cache); return the snapshot directory."""
    from huggingface_hub import snapshot_download

    with hub_errors(repo):
        prepare()
        return Path(snapshot_download(repo, revision=revision, allow_patterns=list(files)))


def commit(
    repo_id: str,
    files: dict[str, str | bytes],
    *,
    message: str,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload ``files`` (path in the repository -> local path or bytes) in one commit; return its URL.

    The repository (and the branch ``revision``) is created when absent. ``token`` defaults to
    huggingface_hub's login (``hf auth login`` or ``HF_TOKEN``), ``endpoint`` to ``HF_ENDPOINT``.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in files.items()]
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(repo_id, action="push to"):
        prepare()
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations=operations, commit_message=message, revision=revision, create_pr=create_pr)
    return info.pr_url or info.commit_url


@contextmanager
def hub_errors(repo: str, action: str = "fetch") -> Iterator[None]:
    """Turn huggingface_hub failures inside the block into one-line :class:`PosthocError`s."""
    from huggingface_hub import errors as hf_errors

    try:
        yield
    except hf_errors.OfflineModeIsEnabled as e:
        if _unreachable is not None:
            what = "is not in the local Hugging Face cache and" if action == "fetch" else "cannot be pushed:"
            raise PosthocError(
                f"'{repo}' {what} the Hub ({_unreachable}) did not answer within {CONNECT_TIMEOUT:g} s; check the "
                "network, or set HF_HUB_OFFLINE=1 to work from the cache without trying"
            ) from e
        if action == "fetch":
            raise PosthocError(
                f"'{repo}' is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it; "
                "unset HF_HUB_OFFLINE or download it once with network access"
            ) from e
        raise PosthocError(f"cannot {action} '{repo}' while HF_HUB_OFFLINE=1 is set; unset it to reach the Hub") from e
    except hf_errors.LocalEntryNotFoundError as e:
        if _unreachable is not None:
            raise PosthocError(
                f"'{repo}' is not in the local Hugging Face cache and the Hub ({_unreachable}) did not answer within "
                f"{CONNECT_TIMEOUT:g} s; check the network, or download it once where the Hub can be reached"
            ) from e
        raise PosthocError(
            f"'{repo}' is not in the local Hugging Face cache and the Hub cannot be reached "
            "(offline or HF_HUB_OFFLINE=1); download it once with network access, or pass a local path"
        ) from e
    except hf_errors.GatedRepoError as e:
        raise PosthocError(
            f"Hub repository '{repo}' is gated; request access on its Hub page, then log in (hf auth login)"
        ) from e
    except hf_errors.RepositoryNotFoundError as e:
        raise PosthocError(
            f"Hub repository '{repo}' does not exist or is private; check the name or log in (hf auth login)"
        ) from e
    except hf_errors.RevisionNotFoundError as e:
        raise PosthocError(f"Hub repository '{repo}' has no such revision: {first_line(e)}") from e
    except hf_errors.EntryNotFoundError as e:
        raise PosthocError(f"Hub repository '{repo}' lacks a file it needs: {first_line(e)}") from e
    except hf_errors.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            raise PosthocError(
                f"the Hub refused to {action} '{repo}' (401, not logged in); run 'hf auth login' or pass --token"
            ) from e
        if status == 403:
            need = "write access to that namespace" if action != "fetch" else "read access to that repository"
            raise PosthocError(f"the Hub refused to {action} '{repo}' (403); your token needs {need}") from e
        raise PosthocError(f"could not {action} '{repo}' on the Hugging Face Hub: {first_line(e)}") from e
    except (OSError, *_transport_errors()) as e:  # connection refused, DNS failures, timeouts
        if isinstance(e, OSError) and not isinstance(e, ConnectionError) and "connect" not in str(e).lower():
            raise  # a local file problem, not the Hub's
        raise PosthocError(f"cannot reach the Hugging Face Hub to {action} '{repo}': {first_line(e)}") from e


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's connection-level errors (huggingface_hub ships httpx as ``httpx2``)."""
    try:
        import httpx2 as httpx
    except ImportError:  # pragma: no cover - older huggingface_hub
        try:
            import httpx
        except ImportError:
            return ()
    return (httpx.TransportError,)
