"""`blip2-hf push` / `hub.push_folder` on a network that fails: an endpoint that accepts connections and never answers
fails the push within the timeout, a refused connection is one line naming the endpoint (no traceback), and a repo
that the push created is deleted again when the upload fails after it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from hub_server import TEST_USER, TestHub, client_env, patch_client

from blip2_hf import cli, hub
from blip2_hf.testing_utils import save_tiny_generation_checkpoint

# huggingface_hub fetches its agent registry once (3 s timeout of its own) before the first real request.
CLIENT_OVERHEAD_S = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("stage2")
    save_tiny_generation_checkpoint(path, "opt")
    return path


@pytest.fixture
def silent_endpoint():
    """An endpoint that accepts TCP connections (the kernel's backlog) and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


@pytest.fixture
def refused_endpoint():
    """An endpoint where nothing listens: every connection is refused."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return f"http://127.0.0.1:{port}"


def test_silent_endpoint_fails_within_the_timeout(folder, silent_endpoint, tmp_path):
    with patch_client(silent_endpoint, str(tmp_path / "hf_home")):
        start = time.monotonic()
        with pytest.raises(hub.PushError) as caught:
            hub.push_folder(folder, f"{TEST_USER}/never", timeout=1)
        elapsed = time.monotonic() - start
    message = str(caught.value)
    assert elapsed < 1 + CLIENT_OVERHEAD_S + 5, elapsed
    assert "\n" not in message
    assert message.startswith(f"Could not create the repo {TEST_USER}/never: the Hub at {silent_endpoint} did not "
                              "answer within 1 s (POST /api/repos/create)")  # fmt: skip
    # the shared client is as it was: the limit applies to the push only
    from huggingface_hub.utils import get_session

    assert get_session().timeout.read is None


def test_cli_push_to_a_silent_endpoint_is_one_line_within_the_timeout(folder, silent_endpoint, tmp_path):
    """The whole command in its own process (the client configured by HF_ENDPOINT, as a user runs it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(client_env(silent_endpoint, str(tmp_path / "hf_home")))
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "blip2_hf.cli", "push", str(folder), f"{TEST_USER}/never", "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=120,  # today's code never returns: this expires
        env=env,
    )
    assert time.monotonic() - start < 90
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"blip2-hf push: error: Could not create the repo {TEST_USER}/never: the Hub at "
                               f"{silent_endpoint} did not answer within 1 s")  # fmt: skip
    assert proc.stdout == ""


def test_refused_connection_is_one_line_naming_the_endpoint(folder, refused_endpoint, tmp_path, capsys):
    with patch_client(refused_endpoint, str(tmp_path / "hf_home")):
        code = cli.main(["push", str(folder), f"{TEST_USER}/refused"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"blip2-hf push: error: Could not create the repo {TEST_USER}/refused: cannot reach "
                               f"the Hub at {refused_endpoint}: ConnectError")  # fmt: skip
    assert "POST /api/repos/create" in lines[0]


def test_timeout_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["push", "folder", "user/repo", "--timeout", "0"])
    assert "must be more than 0" in capsys.readouterr().err


@pytest.fixture
def test_hub(tmp_path):
    with TestHub() as server, patch_client(server.url, str(tmp_path / "hf_home")):
        yield server


def test_failed_upload_deletes_the_repo_it_created(folder, test_hub):
    repo_id = f"{TEST_USER}/created-then-failed"
    test_hub.fail_next_commit()
    with pytest.raises(hub.PushError, match=rf"HTTP 500.* The repo {repo_id} that this push created was deleted"):
        hub.push_folder(folder, repo_id)
    assert repo_id not in test_hub.repos
    assert ("POST", "/api/repos/create", 200) in test_hub.requests
    assert ("DELETE", "/api/repos/delete", 200) in test_hub.requests
    # the next push creates it again and publishes
    hub.push_folder(folder, repo_id)
    assert "model.safetensors" in test_hub.files(repo_id)


def test_failed_upload_keeps_a_repo_that_existed(folder, test_hub):
    repo_id = f"{TEST_USER}/existing"
    test_hub.create_repo(repo_id, files={"notes.txt": b"mine"})
    before = test_hub.files(repo_id)
    test_hub.fail_next_commit(503)
    with pytest.raises(hub.PushError, match="HTTP 503") as caught:
        hub.push_folder(folder, repo_id)
    assert "deleted" not in str(caught.value)
    assert test_hub.files(repo_id) == before
    assert not any(method == "DELETE" for method, _, _ in test_hub.requests)


def test_failed_upload_on_a_new_branch_of_a_new_repo_deletes_it(folder, test_hub):
    repo_id = f"{TEST_USER}/new-with-branch"
    test_hub.fail_next_commit()
    with pytest.raises(hub.PushError, match="was deleted again"):
        hub.push_folder(folder, repo_id, revision="dev")
    assert repo_id not in test_hub.repos
