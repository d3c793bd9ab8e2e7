"""The Hub: `posthoc push` against a local HTTP endpoint speaking the Hub's commit API, and loading an
artifact back through the local Hugging Face cache as `hf-hub:org/name` (offline)."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar
from urllib.parse import urlparse

import pytest
import torch

import posthoc
from posthoc import Ensemble, PosthocError
from posthoc.cli import main
from posthoc.commands.push import push

from .helpers import fill_hf_cache, tiny_model

TOKEN = "hf_test_token"
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class FakeHub(BaseHTTPRequestHandler):
    """The part of the Hub API that ``HfApi.create_repo`` / ``create_commit`` use, kept in memory."""

    repos: ClassVar[dict[str, dict]] = {}
    commits: ClassVar[list[dict]] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._reply(401, {"error": "Invalid credentials in Authorization header"})
        path = urlparse(self.path).path
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo = f"{payload['organization']}/{payload['name']}"
            self.repos.setdefault(repo, {"visibility": payload.get("visibility"), "files": {}})
            return self._reply(200, {"url": f"http://{self.headers['Host']}/{repo}"})
        if path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        parts = path.split("/")  # /api/models/{org}/{name}/{preupload|commit}/{revision}
        repo, action = f"{parts[3]}/{parts[4]}", parts[5]
        if repo not in self.repos:
            return self._reply(404, {"error": "Repository not found"})
        if action == "branch":
            self.repos[repo].setdefault("branches", []).append(parts[6])
            return self._reply(200, {})
        if action == "preupload":
            files = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                for f in json.loads(body)["files"]
            ]
            return self._reply(200, {"files": files})
        if action == "commit":
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            files = {v["value"]["path"]: base64.b64decode(v["value"]["content"]) for v in lines if v["key"] == "file"}
            header = next(v["value"] for v in lines if v["key"] == "header")
            self.repos[repo]["files"].update(files)
            self.commits.append({"repo": repo, "revision": parts[6], "summary": header["summary"], "files": sorted(files)})
            oid = hashlib.sha1(body).hexdigest()
            return self._reply(
                200, {"commitOid": oid, "commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{oid}", "pullRequestUrl": None}
            )
        return self._reply(404, {"error": f"unknown endpoint {path}"})


@pytest.fixture
def hub(monkeypatch):
    """A fresh fake Hub on localhost; huggingface_hub pointed at it and allowed online for the test."""
    from huggingface_hub import constants

    FakeHub.repos, FakeHub.commits = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield FakeHub
    server.shutdown()
    server.server_close()


@pytest.fixture
def artifact(tmp_path):
    ens = Ensemble.from_models([tiny_model("test_resnet", seed=s) for s in range(2)])
    return posthoc.save(ens, tmp_path / "deep2")


def test_push_uploads_the_artifact_in_one_commit_with_a_hub_card(hub, artifact, capsys):
    assert main(["push", str(artifact), "--repo", "me/tiny-deep2", "--token", TOKEN, "--private"]) == 0
    assert "pushed" in capsys.readouterr().out
    assert hub.repos["me/tiny-deep2"]["visibility"] == "private"
    assert [c["files"] for c in hub.commits] == [["README.md", "config.json", "model.safetensors"]]
    files = hub.repos["me/tiny-deep2"]["files"]
    assert files["model.safetensors"] == (artifact / "model.safetensors").read_bytes()
    assert files["config.json"] == (artifact / "config.json").read_bytes()
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: posthoc") and 'posthoc.load("hf-hub:me/tiny-deep2")' in card
    assert "PATH_OR_REPO" in (artifact / "README.md").read_text()  # the local card is left as it was


def test_push_to_a_branch_with_a_message(hub, artifact, capsys):
    argv = ["push", str(artifact), "--repo", "hf-hub:me/tiny-deep2", "--revision", "v2", "-m", "second try", "--token", TOKEN]
    assert main(argv) == 0
    assert 'posthoc.load("hf-hub:me/tiny-deep2@v2")' in capsys.readouterr().out
    assert hub.repos["me/tiny-deep2"]["branches"] == ["v2"]
    assert [(c["revision"], c["summary"]) for c in hub.commits] == [("v2", "second try")]
    assert 'posthoc.load("hf-hub:me/tiny-deep2@v2")' in hub.repos["me/tiny-deep2"]["files"]["README.md"].decode()


def test_pushed_artifact_loads_back_offline_from_the_cache(hub, artifact, image_data, monkeypatch, capsys):
    from huggingface_hub import constants

    url = push(artifact, "me/tiny-deep2", token=TOKEN)
    assert "/me/tiny-deep2/commit/" in url and len(hub.commits) == 1
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fill_hf_cache("me/tiny-deep2", hub.repos["me/tiny-deep2"]["files"])
    local, remote = posthoc.load(artifact), posthoc.load("hf-hub:me/tiny-deep2")
    with torch.no_grad():
        assert torch.equal(local(X), remote(X))
    assert remote.posthoc_name == "hf-hub:me/tiny-deep2"
    assert main(["info", "hf-hub:me/tiny-deep2"]) == 0
    assert "members" in capsys.readouterr().out
    assert main(["eval", "hf-hub:me/tiny-deep2", "--data", str(image_data), "--no-progress", "-j", "0"]) == 0
    assert "hf-hub:me/tiny-deep2" in capsys.readouterr().out
    assert main(["eval", "hf-hub:me/tiny-deep2", "--data", str(image_data), "--num-classes", "5"]) == 2
    assert "--num-classes 5 would give hf-hub:me/tiny-deep2 a new, untrained classifier" in capsys.readouterr().err
    assert main(["ensemble", "hf-hub:me/tiny-deep2", str(artifact), "--out", str(artifact.parent / "x")]) == 2
    assert "hf-hub:me/tiny-deep2 is already an ensemble artifact" in capsys.readouterr().err


def test_push_errors_are_one_line(hub, artifact, tmp_path, capsys):
    assert main(["push", str(artifact), "--repo", "me/tiny-deep2", "--token", "wrong"]) == 2
    assert "401, not logged in); run 'hf auth login' or pass --token" in capsys.readouterr().err
    assert main(["push", str(artifact), "--repo", "tiny-deep2", "--token", TOKEN]) == 2
    assert "not a Hub repository id; write it as org/name" in capsys.readouterr().err
    assert main(["push", str(tmp_path), "--repo", "me/x", "--token", TOKEN]) == 2
    assert "is not a posthoc artifact" in capsys.readouterr().err
    weights = artifact / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["push", str(artifact), "--repo", "me/tiny-deep2", "--token", TOKEN]) == 2
    assert "does not match the SHA-256" in capsys.readouterr().err
    assert hub.commits == []  # nothing was published


def test_push_refuses_offline_mode(artifact, capsys):
    assert main(["push", str(artifact), "--repo", "me/tiny-deep2", "--token", TOKEN]) == 2
    assert "HF_HUB_OFFLINE=1 is set; unset it" in capsys.readouterr().err


def test_timm_repo_is_not_an_artifact(tmp_path):
    from .helpers import save_hub_layout

    files = {p.name: p.read_bytes() for p in save_hub_layout(tiny_model(), tmp_path / "m").iterdir()}
    fill_hf_cache("someone/plain-resnet", files)
    assert isinstance(posthoc.load_model("hf-hub:someone/plain-resnet"), torch.nn.Module)
    with pytest.raises(PosthocError, match="holds a timm model, not a posthoc artifact"):
        posthoc.load("hf-hub:someone/plain-resnet")
