"""Model registry: validation, cache, downloads from a local HTTP server (good / bad checksum,
interrupted then resumed with Range), offline messages, name resolution."""

from __future__ import annotations

import copy
import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest

from BrainIDLib import registry as reg
from BrainIDLib.errors import BrainIDError
from BrainIDLib.resources import resource_path

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # ~1 MB, several download chunks
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Server:
    """Serves PAYLOAD at /model.bin with Range support; can cut the first response short."""

    def __init__(self):
        self.requests: list[dict] = []
        self.cut_first_at: int | None = None
        self.ignore_range = False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append({"path": self.path, "range": rng})
                if self.path != "/model.bin":
                    self.send_error(404)
                    return
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(PAYLOAD):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
                else:
                    self.send_response(200)
                body = PAYLOAD[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                if server.cut_first_at is not None:
                    cut, server.cut_first_at = server.cut_first_at, None
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _registry_doc(url: str, sha: str | None = SHA, size: int | None = len(PAYLOAD), **extra) -> dict:
    f = {"filename": "model.bin", "role": "model", "urls": [url], "sha256": sha, "size": size}
    f.update(extra)
    return {"format_version": 1, "default": None, "models": [{
        "name": "tiny", "aliases": ["tiny-alias"], "description": "test model", "tasks": ["segmentation"],
        "architecture": {"f_maps": 8, "levels": 3}, "licence": "test", "source": "unit test", "files": [f]}]}


@pytest.fixture
def env(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("BRAINID_CACHE", str(cache))
    monkeypatch.delenv("BRAINID_OFFLINE", raising=False)
    monkeypatch.setenv("BRAINID_ALLOW_HTTP", "1")  # the test servers listen on plain http://127.0.0.1
    monkeypatch.delenv("BRAINID_ALLOW_UNVERIFIED", raising=False)

    def use(doc: dict) -> Path:
        path = tmp_path / "models.json"
        path.write_text(json.dumps(doc))
        monkeypatch.setenv("BRAINID_REGISTRY", str(path))
        return path

    use.cache = cache
    return use


def test_shipped_registry_is_valid_and_has_official_entry(monkeypatch):
    monkeypatch.delenv("BRAINID_REGISTRY", raising=False)
    registry = reg.load_registry()
    official = registry.get("official")
    assert official is not None and registry.get("brain-id") is official
    f = official.model_file
    assert f.filename == "brain_id_pretrained.pth" and f.sha256 is None and f.verify is False and not f.urls
    assert "1vuNu2dt-YdBCRW1E4gJtUsi0b_BcX6S_" in f.manual["url"]
    assert official.architecture == {"f_maps": 64, "levels": 5, "num_groups": 8, "in_channels": 1}
    # every other entry must be verifiable
    for m in registry.models:
        if m.name != "official":
            assert all(x.sha256 and x.verify for x in m.files), m.name


def test_validation_names_the_problems():
    good = _registry_doc("http://example.org/model.bin")
    assert reg.validate_registry(good) == []
    cases = {
        "sha256": lambda d: d["models"][0]["files"][0].update(sha256=None),  # null but verify not false
        "64 lower-case hex": lambda d: d["models"][0]["files"][0].update(sha256="abc"),
        "plain file name": lambda d: d["models"][0]["files"][0].update(filename="../evil.pth"),
        "http(s) URLs": lambda d: d["models"][0]["files"][0].update(urls=["file:///etc/passwd"]),
        "'tasks'": lambda d: d["models"][0].update(tasks=["telepathy"]),
        "exactly one file": lambda d: d["models"][0]["files"][0].update(role="head:segmentation"),
        "'default'": lambda d: d.update(default="nope"),
        "'name'": lambda d: d["models"][0].update(name="Bad Name"),
        "'licence'": lambda d: d["models"][0].pop("licence"),
        "without '..'": lambda d: d["models"][0]["files"][0].update(path="../../x.safetensors"),
        "used twice": lambda d: d["models"].append(copy.deepcopy(d["models"][0])),
    }
    for needle, mutate in cases.items():
        doc = copy.deepcopy(good)
        mutate(doc)
        problems = reg.validate_registry(doc)
        assert any(needle in p for p in problems), (needle, problems)
    # verify=false may omit the checksum
    doc = copy.deepcopy(good)
    doc["models"][0]["files"][0].update(sha256=None, verify=False)
    assert reg.validate_registry(doc) == []


def test_invalid_registry_file_is_one_clear_error(env, tmp_path):
    doc = _registry_doc("http://example.org/model.bin", sha="xyz")
    path = env(doc)
    with pytest.raises(BrainIDError, match="is invalid: .*sha256"):
        reg.load_registry()
    path.write_text("{not json")
    with pytest.raises(BrainIDError, match="not readable JSON"):
        reg.load_registry()


def test_download_good_checksum(env, server):
    env(_registry_doc(server.url + "/model.bin"))
    seen = []
    path = reg.download("tiny", progress=lambda done, total, msg: seen.append((done, total)))
    assert path == env.cache / "tiny" / "model.bin"
    assert path.read_bytes() == PAYLOAD
    assert not (env.cache / "tiny" / "model.bin.part").exists()
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    entry = reg.load_registry().get("tiny")
    assert reg.model_status(entry) == "cached" and reg.model_status(entry, check=True) == "verified"
    # resolving by name or alias uses the cache, no new request
    n = len(server.requests)
    assert reg.resolve_weights("tiny-alias") == path
    assert len(server.requests) == n


def test_download_bad_checksum_is_not_kept(env, server):
    env(_registry_doc(server.url + "/model.bin", sha="0" * 64))
    with pytest.raises(reg.ChecksumError, match="SHA-256 .* expected 0{64}.*deleted"):
        reg.download("tiny")
    folder = env.cache / "tiny"
    assert not (folder / "model.bin").exists() and not (folder / "model.bin.part").exists()


def test_interrupted_download_resumes_with_range(env, server):
    env(_registry_doc(server.url + "/model.bin"))
    server.cut_first_at = 300_000
    with pytest.raises(BrainIDError, match="interrupted.*run `brainid download tiny` again to resume"):
        reg.download("tiny")
    part = env.cache / "tiny" / "model.bin.part"
    assert part.is_file() and 0 < part.stat().st_size < len(PAYLOAD)
    assert not (env.cache / "tiny" / "model.bin").exists()
    entry = reg.load_registry().get("tiny")
    assert reg.model_status(entry) == "partial"
    have = part.stat().st_size
    path = reg.download("tiny")
    assert path.read_bytes() == PAYLOAD
    assert server.requests[-1]["range"] == f"bytes={have}-"
    assert not part.exists()


def test_server_ignoring_range_restarts_cleanly(env, server):
    env(_registry_doc(server.url + "/model.bin"))
    part = env.cache / "tiny" / "model.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage-prefix")
    server.ignore_range = True
    assert reg.download("tiny").read_bytes() == PAYLOAD


def test_cached_file_corrupted_later_is_refused(env, server):
    env(_registry_doc(server.url + "/model.bin"))
    path = reg.download("tiny")
    path.write_bytes(b"tampered")
    with pytest.raises(reg.ChecksumError, match="delete it and run `brainid download tiny` again"):
        reg.resolve_weights("tiny")


def test_offline_message_names_the_file_to_place(env, monkeypatch, server):
    env(_registry_doc(server.url + "/model.bin"))
    monkeypatch.setenv("BRAINID_OFFLINE", "1")
    with pytest.raises(reg.ManualDownloadRequired) as e:
        reg.download("tiny")
    msg = str(e.value)
    assert str(env.cache / "tiny" / "model.bin") in msg and SHA in msg and "\n" not in msg
    assert server.requests == []


def test_unreachable_server_says_where_to_place_file(env):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    env(_registry_doc(f"http://127.0.0.1:{port}/model.bin"))
    with pytest.raises(reg.ManualDownloadRequired, match="could not download model.bin .*save it as .*model.bin"):
        reg.download("tiny")


def test_http_error_is_reported(env, server):
    env(_registry_doc(server.url + "/missing.bin"))
    with pytest.raises(reg.ManualDownloadRequired, match="HTTP 404"):
        reg.download("tiny")


def test_official_entry_needs_manual_placement(env, monkeypatch):
    monkeypatch.delenv("BRAINID_REGISTRY", raising=False)
    with pytest.raises(reg.ManualDownloadRequired) as e:
        reg.resolve_weights("official")
    expected = env.cache / "official" / "brain_id_pretrained.pth"
    assert str(expected) in str(e.value) and "drive.google.com" in str(e.value)
    entry = reg.load_registry().get("official")
    text = reg.manual_instructions(entry, entry.model_file)
    assert str(expected) in text and "No checksum" in text
    # placed by hand: used (unverified) without a download
    expected.parent.mkdir(parents=True)
    expected.write_bytes(b"placeholder")
    assert reg.resolve_weights("official") == expected
    assert reg.model_status(entry, check=True) == "unverified"


def test_shipped_file_is_verified(env, tmp_path, monkeypatch):
    from BrainIDLib import resources

    res = tmp_path / "res"
    (res / "weights").mkdir(parents=True)
    (res / "weights" / "lite.safetensors").write_bytes(PAYLOAD)
    monkeypatch.setattr(reg, "resources_dir", lambda: res)
    doc = _registry_doc("http://unused.invalid/x")
    f = doc["models"][0]["files"][0]
    f.pop("urls")
    f.update(path="weights/lite.safetensors")
    doc["default"] = "tiny"
    env(doc)
    assert reg.resolve_weights("tiny") == res / "weights" / "lite.safetensors"
    assert reg.default_model().name == "tiny"
    assert reg.model_status(reg.load_registry().get("tiny")) == "shipped"
    (res / "weights" / "lite.safetensors").write_bytes(b"changed")
    with pytest.raises(reg.ChecksumError, match="shipped with BrainID.*reinstall"):
        reg.resolve_weights("tiny")
    assert resources.resources_dir() != res  # only the registry module was redirected


def test_resolution_errors(env, tmp_path):
    env(_registry_doc("http://example.org/model.bin"))
    with pytest.raises(BrainIDError, match="weights file not found"):
        reg.resolve_weights(tmp_path / "nope.pth")
    with pytest.raises(BrainIDError, match="registered: tiny"):
        reg.resolve_weights("unknown-model")
    with pytest.raises(BrainIDError, match="is a folder"):
        reg.resolve_weights(tmp_path)
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x")
    assert reg.resolve_weights(str(f)) == f


def test_no_default_model_message(env, monkeypatch):
    doc = json.loads(resource_path("models.json").read_text())  # the shipped registry without its default
    doc["default"] = None
    doc["models"] = [m for m in doc["models"] if m["name"] == "official"]
    env(doc)
    assert reg.default_model() is None
    msg = reg.how_to_get_weights()
    assert "brainid download" in msg and "official" in msg and "brain_id_pretrained.pth" in msg
    assert "\n" not in msg


def test_registry_head_files_are_resolved(env, server):
    doc = _registry_doc(server.url + "/model.bin")
    doc["models"][0]["files"].append({"filename": "seg-head.bin", "role": "head:segmentation",
                                      "urls": [server.url + "/model.bin"], "sha256": SHA, "size": len(PAYLOAD)})
    env(doc)
    path, heads, entry = reg.resolve_model("tiny")
    assert entry.name == "tiny" and path.name == "model.bin"
    assert heads == {"segmentation": env.cache / "tiny" / "seg-head.bin"}
    assert heads["segmentation"].read_bytes() == PAYLOAD
