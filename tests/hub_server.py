"""A test Hub: the part of the Hugging Face Hub's HTTP API that `huggingface_hub` 2.x and `transformers` 5.x call to
push and load a model, served in memory by a stdlib `ThreadingHTTPServer` on 127.0.0.1 (a random port).

No open-source Hub server exists (the real one is private; HF's own tests use the online hub-ci), so this one
answers the real client's calls, read from its source (see /work/shared/notes/ecosystem-offline.md, section 6):

| client call                         | endpoint(s)                                                                    |
|-------------------------------------|--------------------------------------------------------------------------------|
| any first request                   | `GET /api/agent-harnesses` (an empty registry)                                 |
| `whoami`                            | `GET /api/whoami-v2`                                                           |
| `create_repo`                       | `POST /api/repos/create` (409 when it exists, 403 outside the token's namespaces) |
| `delete_repo`                       | `DELETE /api/repos/delete`                                                     |
| `create_commit`                     | `POST /api/validate-yaml` (README.md), `POST .../preupload/{rev}` (always       |
|                                     | "regular": contents travel inline, no LFS/xet), `POST .../commit/{rev}` (ndjson) |
| `create_branch`                     | `POST /api/models/{repo}/branch/{branch}`                                      |
| `hf_hub_download`, `from_pretrained` | `HEAD`/`GET /{repo}/resolve/{rev}/{path}` (X-Repo-Commit, ETag, Content-Length; |
|                                     | 404 with `X-Error-Code: RepoNotFound` / `RevisionNotFound` / `EntryNotFound`)   |
| `repo_info`, `snapshot_download`    | `GET /api/models/{repo}[/revision/{rev}]` (siblings), `GET .../tree/{rev}[/path]` |

Tokens are checked as the Hub does: a wrong token is a 401 (`Invalid credentials in Authorization header`) on any
call, a write without a token a 401, a write with a read-only token or into another user's namespace a 403. A commit
is applied all at once or not at all, and `fail_next_commit()` makes the next one answer 500 without changing
anything. Private repos are visible to their namespace's tokens only (404 `RepoNotFound` otherwise).

Point the real client at it with `HF_ENDPOINT=hub.url` before `huggingface_hub` is imported (subprocesses), or, in a
running process, with `patch_client(hub.url)`. The server binds 127.0.0.1 only and stops itself after
`max_lifetime` seconds if nobody stops it first.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# The dummy credentials the test Hub knows: token -> (user, role). The user also belongs to `TEST_ORG`.
TEST_USER = "testuser"
TEST_ORG = "testorg"
WRITE_TOKEN = "hf_testhubWRITEtoken0123456789abcdef"
READ_TOKEN = "hf_testhubREADtoken0123456789abcdefgh"
OTHER_USER = "otheruser"
OTHER_TOKEN = "hf_testhubOTHERtoken0123456789abcdefg"

_REPO_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<action>[a-z-]+)(?:/(?P<rest>.*))?)?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's `oid` and `ETag`."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    title: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        oid = self.refs.get(revision, revision)
        return self.commits.get(oid)


class HubError(Exception):
    """An HTTP error answered the way the Hub answers it (status, `X-Error-Code`, `X-Error-Message`, JSON body)."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class TestHub:
    """The in-memory Hub. `start()` serves it on 127.0.0.1:<random port> in a daemon thread; `stop()` (or leaving
    `with TestHub() as hub:`) shuts it down. Tests read the state with `files(repo_id)`, `commits(repo_id)` and
    `requests` (every `(method, path, status)` served)."""

    __test__ = False  # not a pytest test class

    def __init__(self, max_lifetime: float = 1800.0):
        self.max_lifetime = max_lifetime
        self.tokens: dict[str, tuple[str, str]] = {
            WRITE_TOKEN: (TEST_USER, "write"),
            READ_TOKEN: (TEST_USER, "read"),
            OTHER_TOKEN: (OTHER_USER, "write"),
        }
        self.orgs: dict[str, list[str]] = {TEST_USER: [TEST_ORG], OTHER_USER: []}
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, int]] = []
        self._fail_next_commit: int | None = None
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Timer | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the hub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> TestHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="test-hub", daemon=True)
        self._thread.start()
        # A forgotten server must not outlive its purpose: it stops itself after `max_lifetime` seconds.
        self._watchdog = threading.Timer(self.max_lifetime, self.stop)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def __enter__(self) -> TestHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- switches and inspection --------------------------------------------------------------------------------------

    def fail_next_commit(self, status: int = 500) -> None:
        """The next `/commit` call answers `status` and changes nothing (a server-side failure mid-publish)."""
        with self._lock:
            self._fail_next_commit = status

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            commit = self.repos[repo_id].resolve(revision)
            return dict(commit.files) if commit else {}

    def commits(self, repo_id: str) -> list[Commit]:
        with self._lock:
            return list(self.repos[repo_id].commits.values())

    def create_repo(self, repo_id: str, private: bool = False, files: dict[str, bytes] | None = None) -> Repo:
        """Create a repo directly (e.g. one owned by another user), with an initial commit as the Hub makes."""
        with self._lock:
            repo = Repo(repo_id, private)
            self.repos[repo_id] = repo
            initial = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", **(files or {})}
            self._commit(repo, "main", "initial commit", initial)
            return repo

    def _commit(self, repo: Repo, branch: str, title: str, files: dict[str, bytes]) -> Commit:
        seed = f"{repo.repo_id}\0{branch}\0{title}\0{next(self._counter)}\0{time.time_ns()}".encode()
        commit = Commit(hashlib.sha1(seed).hexdigest(), title, files)
        repo.commits[commit.oid] = commit
        repo.refs[branch] = commit.oid
        return commit

    # -- auth ---------------------------------------------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> tuple[str | None, str | None]:
        """`(user, role)`, `(None, None)` for anonymous calls; a token the Hub does not know is a 401."""
        if not authorization:
            return None, None
        token = authorization.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def _namespaces(self, user: str) -> list[str]:
        return [user, *self.orgs.get(user, [])]

    def _require_write(self, user: str | None, role: str | None, repo_id: str, action: str) -> None:
        if user is None:
            raise HubError(401, f"You must be authenticated to {action} {repo_id}")
        namespace = repo_id.split("/")[0]
        if namespace not in self._namespaces(user):
            raise HubError(403, f'You don\'t have the rights to {action} {repo_id} in the namespace "{namespace}"')
        if role != "write":
            raise HubError(403, f"Your token has the role '{role}': to {action} {repo_id} it needs 'write'")

    def _readable_repo(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and (user is None or repo_id.split("/")[0] not in self._namespaces(user))):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _revision(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # -- endpoints ----------------------------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: bytes) -> _Response:
        user, role = self.authenticate(headers.get("Authorization"))
        if path == "/api/agent-harnesses" and method == "GET":
            return _Response.json({"standardEnvVars": [], "harnesses": {}})
        if path == "/api/whoami-v2" and method == "GET":
            if user is None:
                raise HubError(401, "Invalid username or password.")
            orgs = [{"name": org, "type": "org"} for org in self.orgs.get(user, [])]
            return _Response.json(
                {
                    "type": "user",
                    "name": user,
                    "orgs": orgs,
                    "auth": {"type": "access_token", "accessToken": {"role": role}},
                }
            )
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(user, role, json.loads(body or b"{}"))
        if path == "/api/repos/delete" and method == "DELETE":
            return self._delete_repo(user, role, json.loads(body or b"{}"))
        if path == "/api/validate-yaml" and method == "POST":
            return _validate_yaml(json.loads(body or b"{}").get("content", ""))
        match = _RESOLVE.match(path)
        if match and method in ("GET", "HEAD"):
            return self._resolve(user, match["repo"], unquote(match["rev"]), unquote(match["path"]), headers)
        match = _REPO_API.match(path)
        if match:
            repo_id, action, rest = match["repo"], match["action"], unquote(match["rest"] or "")
            if action == "preupload" and method == "POST":
                return self._preupload(user, role, repo_id, rest, json.loads(body or b"{}"))
            if action == "commit" and method == "POST":
                return self._commit_endpoint(user, role, repo_id, rest, body)
            if action == "branch" and method == "POST":
                return self._create_branch(user, role, repo_id, rest, json.loads(body or b"{}"))
            if action in (None, "revision") and method == "GET":
                return self._info(user, repo_id, rest or "main")
            if action == "tree" and method == "GET":
                revision, _, prefix = rest.partition("/")
                return self._tree(user, repo_id, revision, prefix, query.get("recursive", ["false"])[0] == "true")
        raise HubError(404, f"Not implemented by the test hub: {method} {path}")

    def _create_repo(self, user: str | None, role: str | None, payload: dict) -> _Response:
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        if payload.get("type", "model") not in (None, "model"):
            raise HubError(400, "The test hub serves model repos only")
        self._require_write(user, role, repo_id, "create a model")
        with self._lock:
            if repo_id in self.repos:
                return _Response.json(
                    {"error": "You already created this model repo", "url": f"{self._base}/{repo_id}"}, 409
                )
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.create_repo(repo_id, private=private)
        return _Response.json({"url": f"{self._base}/{repo_id}", "name": repo_id, "id": repo_id})

    def _delete_repo(self, user: str | None, role: str | None, payload: dict) -> _Response:
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        self._require_write(user, role, repo_id, "delete")
        with self._lock:
            if self.repos.pop(repo_id, None) is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
        return _Response.json({})

    def _preupload(self, user: str | None, role: str | None, repo_id: str, revision: str, payload: dict) -> _Response:
        repo = self._readable_repo(repo_id, user)
        self._require_write(user, role, repo_id, "write to")
        with self._lock:
            existing = (repo.resolve(revision) or Commit("", "", {})).files
        files = [
            {
                "path": item["path"],
                # "regular": the client sends every content inline in the commit (no LFS, no xet), with or
                # without hf_xet installed. The oid of an existing file lets the client skip unchanged ones.
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_sha1(existing[item["path"]]) if item["path"] in existing else None,
            }
            for item in payload.get("files", [])
        ]
        return _Response.json({"files": files, "commitOid": repo.refs.get(revision)})

    def _commit_endpoint(
        self, user: str | None, role: str | None, repo_id: str, revision: str, body: bytes
    ) -> _Response:
        repo = self._readable_repo(repo_id, user)
        self._require_write(user, role, repo_id, "write to")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        with self._lock:
            status, self._fail_next_commit = self._fail_next_commit, None
            if status is not None:
                raise HubError(status, "Internal Error (the test hub was told to fail this commit)")
            parent = repo.resolve(revision)
            if parent is None:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            files, title = dict(parent.files), ""
            # Build the new tree completely before touching the repo: a commit is all or nothing.
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "header":
                    title = value.get("summary", "")
                    if value.get("parentCommit") not in (None, parent.oid):
                        raise HubError(412, "A commit has happened since the parent commit", "ConflictingCommit")
                elif key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                    del files[value["path"]]
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {path: data for path, data in files.items() if not path.startswith(prefix)}
                else:  # lfsFile: never asked for, preupload answers "regular" only
                    raise HubError(400, f"The test hub does not accept {key!r} operations")
            commit = self._commit(repo, revision, title, files)
        return _Response.json(
            {
                "commitUrl": f"{self._base}/{repo_id}/commit/{commit.oid}",
                "commitOid": commit.oid,
                "pullRequestUrl": None,
            }
        )

    def _create_branch(
        self, user: str | None, role: str | None, repo_id: str, branch: str, payload: dict
    ) -> _Response:
        repo = self._readable_repo(repo_id, user)
        self._require_write(user, role, repo_id, "write to")
        with self._lock:
            if branch in repo.refs:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            repo.refs[branch] = self._revision(repo, payload.get("startingPoint") or "main").oid
        return _Response.json({})

    def _info(self, user: str | None, repo_id: str, revision: str) -> _Response:
        repo = self._readable_repo(repo_id, user)
        commit = self._revision(repo, revision)
        return _Response.json(
            {
                "_id": repo_id,
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit.oid,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "lastModified": "2024-01-01T00:00:00.000Z",
                "createdAt": "2024-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            }
        )

    def _tree(self, user: str | None, repo_id: str, revision: str, prefix: str, recursive: bool) -> _Response:
        repo = self._readable_repo(repo_id, user)
        commit = self._revision(repo, revision)
        prefix = prefix.strip("/")
        base = prefix + "/" if prefix else ""
        entries: dict[str, dict] = {}
        for path, data in sorted(commit.files.items()):
            if not path.startswith(base):
                continue
            parts = path[len(base) :].split("/")
            # Folders are entries of their own, as on the Hub: every level when recursive, else the first one.
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folder = base + "/".join(parts[:depth])
                entries[folder] = {
                    "type": "directory",
                    "oid": git_blob_sha1(folder.encode()),
                    "size": 0,
                    "path": folder,
                }
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
        if prefix and not entries:
            raise HubError(404, f"{prefix} does not exist on {revision}", "EntryNotFound")
        return _Response.json(list(entries.values()))

    def _resolve(self, user: str | None, repo_id: str, revision: str, path: str, headers: Any) -> _Response:
        repo = self._readable_repo(repo_id, user)
        commit = self._revision(repo, revision)
        if path not in commit.files:
            raise HubError(404, "Entry not found", "EntryNotFound")
        data = commit.files[path]
        extra = {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes"}
        status, full_size = 200, len(data)
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", headers.get("Range") or "")
        if match:
            start, end = int(match[1]), int(match[2]) if match[2] else full_size - 1
            data, status = data[start : end + 1], 206
            extra["Content-Range"] = f"bytes {start}-{start + len(data) - 1}/{full_size}"
        return _Response(status, data, "application/octet-stream", extra)

    @property
    def _base(self) -> str:
        return self.url


@dataclass
class _Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> _Response:
        return cls(status, json.dumps(obj).encode())


def _validate_yaml(content: str) -> _Response:
    """What the Hub checks of a README's metadata before a commit: YAML that parses to a mapping, and a model-index
    whose results each name a task type, a dataset (type and name) and metrics with a type and a value."""
    errors: list[str] = []
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
    metadata: Any = {}
    if match:
        try:
            metadata = yaml.safe_load(match[1]) or {}
        except yaml.YAMLError as err:
            errors.append(f"Invalid YAML: {err}")
    if not isinstance(metadata, dict):
        errors.append("The metadata must be a YAML mapping")
        metadata = {}
    for entry in metadata.get("model-index") or []:
        if not entry.get("name"):
            errors.append('"model-index[].name" is required')
        for result in entry.get("results") or []:
            if not (result.get("task") or {}).get("type"):
                errors.append('"model-index[].results[].task.type" is required')
            dataset = result.get("dataset") or {}
            if not dataset.get("type") or not dataset.get("name"):
                errors.append('"model-index[].results[].dataset" needs "type" and "name"')
            for metric in result.get("metrics") or []:
                if not metric.get("type") or not isinstance(metric.get("value"), (int, float, str)):
                    errors.append('"model-index[].results[].metrics[]" needs "type" and a "value"')
    body = {"errors": [{"message": message} for message in errors], "warnings": []}
    return _Response.json(body, 400 if errors else 200)


class _Handler(BaseHTTPRequestHandler):
    hub: TestHub
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        pass  # the hub records `requests`; nothing goes to stderr

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        url = urlsplit(self.path)
        body = self._body() if self.command in ("POST", "PUT", "DELETE") else b""
        try:
            response = self.hub.handle(self.command, url.path, parse_qs(url.query), self.headers, body)
        except HubError as err:
            headers = {"X-Error-Message": err.message, **({"X-Error-Code": err.code} if err.code else {})}
            response = _Response(err.status, json.dumps({"error": err.message}).encode(), headers=headers)
        except Exception as err:  # a bug in the test hub: answer 500 and say what
            response = _Response(500, json.dumps({"error": f"test hub: {type(err).__name__}: {err}"}).encode())
        with self.hub._lock:
            self.hub.requests.append((self.command, url.path, response.status))
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve


# ---------------------------------------------------------------------------------------------------------------------
# Pointing the client at it
# ---------------------------------------------------------------------------------------------------------------------


def client_env(url: str, hf_home: str, token: str | None = WRITE_TOKEN) -> dict[str, str]:
    """Environment variables for a subprocess that must use the test Hub (set before huggingface_hub is imported)."""
    env = {
        "HF_ENDPOINT": url,
        "HF_HOME": hf_home,
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    if token is not None:
        env["HF_TOKEN"] = token
    return env


@contextmanager
def patch_client(url: str, hf_home: str, token: str | None = WRITE_TOKEN) -> Iterator[None]:
    """Point this process's `huggingface_hub` and `transformers` at the test Hub, with `hf_home` as an empty cache
    and `token` as `HF_TOKEN`; everything is restored on exit. `HF_ENDPOINT` is read when huggingface_hub is
    imported, so a running process needs its constants patched and transformers' cached `HfApi` dropped."""
    import os

    import huggingface_hub.constants as constants
    import transformers.utils.hub as transformers_hub

    saved_constants = {
        name: getattr(constants, name)
        for name in (
            "ENDPOINT",
            "HUGGINGFACE_CO_URL_TEMPLATE",
            "HF_HUB_OFFLINE",
            "HF_HOME",
            "HF_HUB_CACHE",
            "HF_TOKEN_PATH",
            "HF_STORED_TOKENS_PATH",
            "HF_HUB_DISABLE_TELEMETRY",
        )
    }
    env = client_env(url, hf_home, token)
    saved_env = {name: os.environ.get(name) for name in (*env, "HF_TOKEN")}
    os.environ.update(env)
    if token is None:
        os.environ.pop("HF_TOKEN", None)
    constants.ENDPOINT = url
    constants.HUGGINGFACE_CO_URL_TEMPLATE = url + "/{repo_id}/resolve/{revision}/{filename}"
    constants.HF_HUB_OFFLINE = False
    constants.HF_HUB_DISABLE_TELEMETRY = True
    constants.HF_HOME = hf_home
    constants.HF_HUB_CACHE = os.path.join(hf_home, "hub")
    # No stored token either: only `HF_TOKEN` (or an explicit token) authenticates.
    constants.HF_TOKEN_PATH = os.path.join(hf_home, "token")
    constants.HF_STORED_TOKENS_PATH = os.path.join(hf_home, "stored_tokens")
    saved_api, transformers_hub._hf_api = transformers_hub._hf_api, None
    try:
        yield
    finally:
        for name, value in saved_constants.items():
            setattr(constants, name, value)
        transformers_hub._hf_api = saved_api
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
