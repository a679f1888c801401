"""Model registry (Resources/models.json): names to verified weight files.

A registry entry describes one model: what it does (tasks, label table, architecture), where it
comes from (licence, source) and its files. Each file is either shipped inside Resources/
(`path`, always with a SHA-256), downloadable (`urls`, resumable, SHA-256 checked before use) or
placed by hand (`manual`). Downloaded and hand-placed files live in the cache,
`$BRAINID_CACHE/<model>/<filename>` (default `~/.cache/brainid`).

Nothing here unpickles anything: files are only hashed and moved; loading goes through
`BrainIDLib.weights.read_checkpoint` (weights_only torch loads with an allowlist, or safetensors).

Environment:
    BRAINID_CACHE     cache folder (default ~/.cache/brainid)
    BRAINID_REGISTRY  a registry JSON file to use instead of the shipped Resources/models.json
    BRAINID_OFFLINE   set to 1 to never touch the network (only say where to place files)
    BRAINID_ALLOW_UNVERIFIED  set to 1 to download files the registry gives no SHA-256 for
    BRAINID_ALLOW_HTTP        set to 1 to download over plain http:// (the SHA-256 still decides)

Downloads: one process at a time per file (an fcntl lock file, `<file>.lock`, next to the `.part`;
a second process waits, then finds the finished file). A download never grows past the registry's
`size`; a file without a declared size is only fetched over https with a SHA-256, and never past
MAX_UNSIZED_BYTES.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import BrainIDError
from .files import sha256_of
from .resources import resources_dir
from .tasks import HEAD_TASKS

REGISTRY_VERSION = 1
MAX_UNSIZED_BYTES = 8 << 30  # cap for a verified https download whose size the registry does not give
CHUNK = 1 << 20
TIMEOUT_S = 30
USER_AGENT = "BrainID-downloader/1"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_ARCH_KEYS = {"f_maps", "levels", "num_groups", "in_channels"}

# progress(done_bytes, total_bytes_or_None, message)
Progress = Callable[[int, "int | None", str], None]


class ChecksumError(BrainIDError):
    """A file's SHA-256 differs from the registry's: it was not kept / not used."""


class ManualDownloadRequired(BrainIDError):
    """The file cannot be fetched automatically (no URL, offline, or network error)."""


# --------------------------------------------------------------------------------------------
# Registry data


@dataclass(frozen=True)
class ModelFile:
    filename: str
    role: str = "model"  # "model" (backbone + heads) or "head:<task>"
    urls: tuple[str, ...] = ()
    path: str | None = None  # shipped, relative to Resources/
    sha256: str | None = None
    size: int | None = None
    verify: bool = True
    manual: dict = field(default_factory=dict)  # {"url": ..., "instructions": ...}

    @property
    def shipped(self) -> bool:
        return self.path is not None

    @property
    def task(self) -> str | None:
        return self.role.split(":", 1)[1] if self.role.startswith("head:") else None


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    files: tuple[ModelFile, ...]
    tasks: tuple[str, ...] = ()
    architecture: dict = field(default_factory=dict)
    labels: object = None
    licence: str = ""
    source: str = ""
    aliases: tuple[str, ...] = ()
    notes: str = ""
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def model_file(self) -> ModelFile:
        return next(f for f in self.files if f.role == "model")

    @property
    def head_files(self) -> dict[str, ModelFile]:
        return {f.task: f for f in self.files if f.task}

    @property
    def verified(self) -> bool:
        return all(f.verify for f in self.files)


@dataclass(frozen=True)
class Registry:
    models: tuple[ModelEntry, ...]
    default: str | None = None
    source: Path | None = None

    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def get(self, name: str) -> ModelEntry | None:
        key = str(name).strip().lower()
        for m in self.models:
            if key == m.name or key in m.aliases:
                return m
        return None


def registry_path() -> Path:
    override = os.environ.get("BRAINID_REGISTRY")
    return Path(override).expanduser() if override else resources_dir() / "models.json"


def validate_registry(data: object) -> list[str]:
    """Every problem in a registry document, as readable strings (empty when valid)."""
    problems: list[str] = []
    if not isinstance(data, dict):
        return ["the registry must be a JSON object with a 'models' list"]
    version = data.get("format_version", REGISTRY_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        problems.append(f"'format_version' must be an integer (got {version!r:.40})")
    elif version > REGISTRY_VERSION:
        problems.append(f"format_version {version} is newer than this BrainID understands")
    models = data.get("models")
    if not isinstance(models, list):
        return problems + ["'models' must be a list"]
    seen: set[str] = set()
    for i, m in enumerate(models):
        where = f"models[{i}]"
        if not isinstance(m, dict):
            problems.append(f"{where} is not an object")
            continue
        name = m.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            problems.append(f"{where}: 'name' must be lower-case letters, digits, '.', '_' or '-' (got {name!r})")
        else:
            where = f"model {name!r}"
        aliases = m.get("aliases", []) or []
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            problems.append(f"{where}: 'aliases' must be a list of names (got {aliases!r:.40})")
            aliases = []
        for alias in [name] + aliases:
            if isinstance(alias, str):
                if alias in seen:
                    problems.append(f"{where}: name or alias {alias!r} is used twice")
                seen.add(alias)
        for key in ("description", "licence", "source"):
            if not isinstance(m.get(key), str) or not m.get(key).strip():
                problems.append(f"{where}: '{key}' must be a non-empty string")
        tasks = m.get("tasks", [])
        if not isinstance(tasks, list) or any(t not in HEAD_TASKS for t in tasks):
            problems.append(f"{where}: 'tasks' must be a list of {', '.join(HEAD_TASKS)} (got {tasks!r})")
        arch = m.get("architecture", {})
        if not isinstance(arch, dict) or set(arch) - _ARCH_KEYS or not all(isinstance(v, int) for v in arch.values()):
            problems.append(f"{where}: 'architecture' must map {sorted(_ARCH_KEYS)} to integers")
        files = m.get("files")
        if not isinstance(files, list) or not files:
            problems.append(f"{where}: 'files' must be a non-empty list")
            continue
        roles = []
        for j, f in enumerate(files):
            fw = f"{where} files[{j}]"
            if not isinstance(f, dict):
                problems.append(f"{fw} is not an object")
                continue
            fn = f.get("filename")
            if not isinstance(fn, str) or not fn or "/" in fn or "\\" in fn or fn in (".", "..") or fn.startswith("."):
                problems.append(f"{fw}: 'filename' must be a plain file name (got {fn!r})")
            role = f.get("role", "model")
            roles.append(role)
            if role != "model" and not (isinstance(role, str) and role.startswith("head:") and role[5:] in HEAD_TASKS):
                problems.append(f"{fw}: 'role' must be 'model' or 'head:<task>' (got {role!r})")
            sha = f.get("sha256")
            verify = f.get("verify", True)
            if not isinstance(verify, bool):
                problems.append(f"{fw}: 'verify' must be true or false")
            if sha is None:
                if verify is not False:
                    problems.append(f"{fw}: 'sha256' is missing; only an entry marked \"verify\": false may omit it")
            elif not isinstance(sha, str) or not _SHA_RE.match(sha):
                problems.append(f"{fw}: 'sha256' must be 64 lower-case hex digits")
            size = f.get("size")
            if size is not None and (not isinstance(size, int) or size <= 0):
                problems.append(f"{fw}: 'size' must be a positive integer or null")
            urls = f.get("urls", [])
            if "url" in f:
                urls = [f["url"]] + list(urls or [])
            if not isinstance(urls, list) or not all(isinstance(u, str) and re.match(r"^https?://", u) for u in urls):
                problems.append(f"{fw}: 'urls' must be a list of http(s) URLs")
            path = f.get("path")
            if path is not None:
                parts = Path(str(path)).parts
                if not isinstance(path, str) or Path(path).is_absolute() or ".." in parts:
                    problems.append(f"{fw}: 'path' must be relative to Resources/ without '..' (got {path!r})")
                if sha is None:
                    problems.append(f"{fw}: a shipped file ('path') needs a 'sha256'")
            manual = f.get("manual", {})
            if not isinstance(manual, dict):
                problems.append(f"{fw}: 'manual' must be an object with 'url' and 'instructions'")
            if path is None and not urls and not manual:
                problems.append(f"{fw}: give a shipped 'path', download 'urls' or 'manual' placement instructions")
        if roles.count("model") != 1:
            problems.append(f"{where}: exactly one file must have role 'model' (found {roles.count('model')})")
    default = data.get("default")
    if default is not None and not isinstance(default, str):
        problems.append(f"'default' must be a model name or null (got {default!r:.40})")
    elif default is not None and default not in seen:
        problems.append(f"'default' names {default!r}, which is not a registered model")
    return problems


def _entry(m: dict) -> ModelEntry:
    files = []
    for f in m["files"]:
        urls = ([f["url"]] if "url" in f else []) + list(f.get("urls", []) or [])
        files.append(ModelFile(filename=f["filename"], role=f.get("role", "model"), urls=tuple(urls),
                               path=f.get("path"), sha256=f.get("sha256"), size=f.get("size"),
                               verify=bool(f.get("verify", True)), manual=dict(f.get("manual", {}) or {})))
    return ModelEntry(name=m["name"], description=m["description"], files=tuple(files),
                      tasks=tuple(m.get("tasks", [])), architecture=dict(m.get("architecture", {})),
                      labels=m.get("labels"), licence=m["licence"], source=m["source"],
                      aliases=tuple(a.lower() for a in m.get("aliases", []) or []), notes=m.get("notes", ""),
                      raw=m)


def load_registry(path: str | os.PathLike | None = None) -> Registry:
    """The registry (BRAINID_REGISTRY or the shipped one), validated; a bad one is a BrainIDError."""
    path = Path(path) if path is not None else registry_path()
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BrainIDError(f"model registry not found: {path}; reinstall BrainID or unset BRAINID_REGISTRY") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BrainIDError(f"model registry {path} is not readable JSON: {e}") from None
    problems = validate_registry(data)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise BrainIDError(f"model registry {path} is invalid: " + "; ".join(problems[:3]) + more)
    return Registry(tuple(_entry(m) for m in data["models"]), data.get("default"), Path(path))


# --------------------------------------------------------------------------------------------
# Cache


def cache_dir() -> Path:
    """`$BRAINID_CACHE`, else `~/.cache/brainid` (not created until something is stored)."""
    env = os.environ.get("BRAINID_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "brainid"


def file_path(entry: ModelEntry, f: ModelFile) -> Path:
    """Where the file is (shipped) or belongs (cache), whether or not it exists yet."""
    if f.shipped:
        return resources_dir() / f.path
    return cache_dir() / entry.name / f.filename


def file_status(entry: ModelEntry, f: ModelFile, check: bool = False) -> str:
    """'shipped', 'cached', 'missing', 'partial' (a resumable .part), or with check=True
    'verified' / 'corrupt' / 'unverified' (present, but no published checksum)."""
    path = file_path(entry, f)
    if not path.is_file():
        part = _part_path(path)
        return "partial" if not f.shipped and part.is_file() else "missing"
    if not f.verify or f.sha256 is None:
        return "unverified"
    if check:
        return "verified" if sha256_of(path) == f.sha256 else "corrupt"
    return "shipped" if f.shipped else "cached"


def model_status(entry: ModelEntry, check: bool = False) -> str:
    """The status of the entry's files, worst first."""
    order = ["corrupt", "missing", "partial", "unverified", "cached", "shipped", "verified"]
    states = [file_status(entry, f, check) for f in entry.files]
    return min(states, key=order.index)


def manual_instructions(entry: ModelEntry, f: ModelFile) -> str:
    """Multi-line, step-by-step text: where to get the file and exactly where to save it."""
    dest = file_path(entry, f)
    lines = [f"To install '{entry.name}' by hand:"]
    src = f.manual.get("url") or (f.urls[0] if f.urls else None) or entry.source
    lines.append(f"  1. Download {f.filename} from {src}")
    if f.manual.get("instructions"):
        lines.append(f"     ({f.manual['instructions']})")
    lines.append(f"  2. Save it as {dest}")
    lines.append(f"     (folder {dest.parent}; set BRAINID_CACHE to use another cache folder)")
    if f.sha256:
        lines.append(f"  3. Its SHA-256 must be {f.sha256}; BrainID checks it before use.")
    else:
        lines.append("  3. No checksum is published for this file, so BrainID cannot verify it; it is still "
                     "loaded safely (tensors only, never arbitrary pickled code).")
    lines.append("  Then check with: brainid models")
    return "\n".join(lines)


def _manual_error(entry: ModelEntry, f: ModelFile, why: str) -> ManualDownloadRequired:
    dest = file_path(entry, f)
    src = f.manual.get("url") or (f.urls[0] if f.urls else None) or entry.source
    sha = f"sha256 {f.sha256}" if f.sha256 else "no published checksum"
    later = f", or run `brainid download {entry.name}` where the network is available" if f.urls else ""
    return ManualDownloadRequired(
        f"{why}; download {f.filename} by hand from {src} and save it as {dest} ({sha}){later}")


# --------------------------------------------------------------------------------------------
# Download


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _offline() -> bool:
    return os.environ.get("BRAINID_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _opted_in(variable: str) -> bool:
    return os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on")


def _check_download_policy(entry: ModelEntry, f: ModelFile, url: str) -> None:
    """Refuse what cannot be checked: no SHA-256, plain http, or no size over http."""
    verified = f.verify and f.sha256 is not None
    if not verified and not _opted_in("BRAINID_ALLOW_UNVERIFIED"):
        raise BrainIDError(f"{entry.name}: the registry gives no SHA-256 for {f.filename}, so its download cannot be "
                           "checked; add its sha256 to the registry, or set BRAINID_ALLOW_UNVERIFIED=1 to fetch it anyway")
    if url.lower().startswith("http://") and not _opted_in("BRAINID_ALLOW_HTTP"):
        raise BrainIDError(f"{entry.name}: {url} is plain http://; use an https:// URL in the registry, or set "
                           "BRAINID_ALLOW_HTTP=1 to fetch it anyway (the SHA-256 is still checked)")
    if f.size is None and not (verified and url.lower().startswith("https://")):
        raise BrainIDError(f"{entry.name}: the registry gives no size for {f.filename}; a download of unknown size "
                           "is only made over https with a SHA-256: add its 'size' to the registry")


class _FileLock:
    """An exclusive lock on `path` across processes (fcntl.flock; msvcrt on Windows), held while open.
    The lock file stays: removing it while another process waits on it would split the lock."""

    def __init__(self, path: Path):
        self.path, self._fh = path, None

    def __enter__(self):
        self._fh = open(self.path, "a+b")
        try:
            import fcntl

            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX)
        except ImportError:  # Windows
            import msvcrt
            import time

            while True:
                try:
                    msvcrt.locking(self._fh.fileno(), msvcrt.LK_NBLCK, 1)
                    break
                except OSError:
                    time.sleep(0.2)
        return self

    def __exit__(self, *exc):
        self._fh.close()  # closing releases the lock


class _Interrupted(Exception):
    pass


class _TooLarge(Exception):
    pass


def _fetch(url: str, part: Path, f: ModelFile, progress: Progress | None, label: str) -> None:
    """Append the rest of `url` to `part`, resuming with an HTTP Range request when possible, never past
    the declared size (or MAX_UNSIZED_BYTES)."""
    have = part.stat().st_size if part.is_file() else 0
    if f.size is not None and have > f.size:
        part.unlink()
        have = 0
    if f.size is not None and have == f.size:
        return  # complete already; the checksum decides
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the part file is the whole file
            return
        raise
    with response:
        status = getattr(response, "status", 200)
        if have and status != 206:  # server ignored the Range: start again
            have = 0
        elif have:
            content_range = response.headers.get("Content-Range", "")
            m = re.match(r"bytes (\d+)-", content_range)
            if m is None or int(m.group(1)) != have:  # not the part we asked for: start again
                response.close()
                part.unlink(missing_ok=True)
                return _fetch(url, part, f, progress, label)
        length = response.headers.get("Content-Length")
        total = (have + int(length)) if length is not None and length.isdigit() else f.size
        cap = f.size if f.size is not None else MAX_UNSIZED_BYTES
        if total is not None and total > cap:
            raise _TooLarge(f"the server announces {total} bytes, more than the {cap} the registry allows")
        mode = "ab" if have else "wb"
        done = have
        if progress:
            progress(done, total, label)
        with open(part, mode) as out:
            while True:
                try:
                    block = response.read(CHUNK)
                except (OSError, socket.timeout, http.client.HTTPException) as e:  # e.g. IncompleteRead
                    raise _Interrupted(f"connection lost after {done} bytes ({e.__class__.__name__})") from None
                if not block:
                    break
                if done + len(block) > cap:
                    raise _TooLarge(f"the server sent more than the {cap} bytes the registry allows")
                out.write(block)
                done += len(block)
                if progress:
                    progress(done, total, label)
        if total is not None and done < total:
            raise _Interrupted(f"connection closed after {done} of {total} bytes")


def download(name: str, progress: Progress | None = None, registry: Registry | None = None,
             force: bool = False) -> Path:
    """Fetch (or find) every file of a registered model; returns the model file's path.

    Resumes a previous `.part` with an HTTP Range request, checks the SHA-256 before the file
    takes its final name (atomic rename), and never keeps a file whose checksum is wrong.
    """
    registry = registry or load_registry()
    entry = registry.get(name)
    if entry is None:
        raise BrainIDError(f"no registered model named {name!r}; known models: {', '.join(registry.names()) or 'none'}")
    for f in entry.files:
        _ensure_file(entry, f, progress, allow_download=True, force=force)
    return file_path(entry, entry.model_file)


def _verify_existing(entry: ModelEntry, f: ModelFile, path: Path) -> None:
    if f.verify and f.sha256 is not None:
        got = sha256_of(path)
        if got != f.sha256:
            where = "shipped with BrainID" if f.shipped else "in the cache"
            fix = ("reinstall BrainID" if f.shipped
                   else f"delete it and run `brainid download {entry.name}` again")
            raise ChecksumError(f"{path} ({where}) has SHA-256 {got}, expected {f.sha256}; "
                                f"the file is damaged or not the registered one: {fix}")


def _ensure_file(entry: ModelEntry, f: ModelFile, progress: Progress | None, allow_download: bool,
                 force: bool = False) -> Path:
    dest = file_path(entry, f)
    if f.shipped:
        if not dest.is_file():
            raise BrainIDError(f"{dest} should be shipped with BrainID but is missing; reinstall BrainID")
        _verify_existing(entry, f, dest)
        return dest
    if dest.is_file() and not force:
        _verify_existing(entry, f, dest)
        return dest
    if not f.urls:
        raise _manual_error(entry, f, f"{entry.name} cannot be downloaded automatically")
    if not allow_download:
        raise _manual_error(entry, f, f"{entry.name} is not in the cache (run `brainid download {entry.name}`)")
    if _offline():
        raise _manual_error(entry, f, "BRAINID_OFFLINE is set, so nothing is downloaded")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _FileLock(dest.with_name(dest.name + ".lock")):
        if dest.is_file() and not force:  # another process finished it while this one waited
            _verify_existing(entry, f, dest)
            return dest
        return _download_file(entry, f, dest, progress)


def _download_file(entry: ModelEntry, f: ModelFile, dest: Path, progress: Progress | None) -> Path:
    """Fetch `f` into `dest` (the caller holds its lock): first working URL, size and SHA-256 checked."""
    part = _part_path(dest)
    errors = []
    for url in f.urls:
        _check_download_policy(entry, f, url)
        try:
            _fetch(url, part, f, progress, f.filename)
            size = part.stat().st_size
        except _Interrupted as e:
            raise BrainIDError(f"download of {f.filename} from {url} was interrupted: {e}; the partial file "
                               f"{part} is kept, run `brainid download {entry.name}` again to resume") from None
        except _TooLarge as e:
            part.unlink(missing_ok=True)
            errors.append(f"{url}: {e}")
            continue
        except urllib.error.HTTPError as e:
            errors.append(f"{url}: HTTP {e.code} {e.reason}")
            continue
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            errors.append(f"{url}: {reason}")
            continue
        if f.size is not None and size != f.size:
            part.unlink(missing_ok=True)
            errors.append(f"{url}: got {size} bytes, expected {f.size}")
            continue
        if f.verify and f.sha256 is not None:
            got = sha256_of(part)
            if got != f.sha256:
                part.unlink(missing_ok=True)
                raise ChecksumError(f"downloaded {f.filename} from {url} has SHA-256 {got}, expected {f.sha256}; "
                                    "the file was deleted and not used (corrupted transfer or a changed file "
                                    "on the server): try again later or report it")
        os.replace(part, dest)
        return dest
    raise _manual_error(entry, f, f"could not download {f.filename} (" + "; ".join(errors)[:300] + ")")


# --------------------------------------------------------------------------------------------
# Resolving names


def _looks_like_path(s: str) -> bool:
    return any(sep in s for sep in ("/", "\\")) or s.endswith((".pth", ".pt", ".safetensors", ".ckpt")) or s.startswith("~")


def resolve_model(name_or_path: str | os.PathLike, download_missing: bool = True,
                  progress: Progress | None = None) -> tuple[Path, dict[str, Path], ModelEntry | None]:
    """(model file, {task: head file from the registry}, registry entry or None for a plain path)."""
    raw = os.fspath(name_or_path)
    path = Path(raw).expanduser()
    if path.is_file():
        return path, {}, None
    if path.is_dir():
        raise BrainIDError(f"{path} is a folder; give a weights file (.pth or .safetensors) or a registered model name")
    registry = load_registry()
    entry = registry.get(raw)
    if entry is None:
        if _looks_like_path(raw):
            raise BrainIDError(f"weights file not found: {path}")
        raise BrainIDError(f"no weights file or registered model named {raw!r}; registered: "
                           f"{', '.join(registry.names()) or 'none'} (see `brainid models`)")
    files = {}
    for f in entry.files:
        files[f.role] = _ensure_file(entry, f, progress, allow_download=download_missing)
    heads = {role[5:]: p for role, p in files.items() if role.startswith("head:")}
    return files["model"], heads, entry


def resolve_weights(name_or_path: str | os.PathLike, download_missing: bool = True,
                    progress: Progress | None = None) -> Path:
    """A weights file from a path or a registry name (downloaded with SHA-256 check if needed)."""
    return resolve_model(name_or_path, download_missing, progress)[0]


def default_model(registry: Registry | None = None) -> ModelEntry | None:
    """The registry's default model (shipped or cached), or None when no default is available; a
    broken registry is reported (BrainIDError), not taken for one without a default."""
    registry = registry or load_registry()
    if not registry.default:
        return None
    entry = registry.get(registry.default)
    if entry is None:
        return None
    if any(file_status(entry, f) in ("missing", "partial") and not (f.urls or f.shipped) for f in entry.files):
        return None  # needs a hand-placed file that is not there
    return entry


def how_to_get_weights(registry: Registry | None = None) -> str:
    """One line telling a user how to get a model when none is available."""
    try:
        registry = registry or load_registry()
        names = registry.names()
    except BrainIDError:
        registry, names = None, []
    parts = ["no model is available: the model registry names no default model (or its file is missing), "
             "and BrainID never runs untrained weights"]
    if names:
        parts.append(f"registered models: {', '.join(names)} (`brainid models` shows their status)")
        parts.append("fetch one with `brainid download NAME` and pass --model NAME")
    official = registry.get("official") if registry else None
    if official is not None:
        f = official.model_file
        src = f.manual.get("url") or official.source
        parts.append(f"for the official Brain-ID weights save {f.filename} from {src} as "
                     f"{file_path(official, f)} and use --model official (anatomy; other tasks need --head TASK=FILE)")
    parts.append("or pass your own weights file with --model PATH")
    return "; ".join(parts)
