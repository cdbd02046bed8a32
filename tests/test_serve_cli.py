"""`ragtune` on the command line: an error that is the user's to fix (a refused bundle, bad settings,
a server that is not there) is one line `ragtune: <message>` and exit code 1, for every subcommand;
`serve` refuses a non-loopback address without a token unless told `--insecure-no-token`."""

import json
import socket
import subprocess
import sys

import pytest

from ragtune.cli import main
from tests.conftest import ROOT

TOKEN_ENV = "RAGTUNE_API_TOKEN"


@pytest.fixture()
def refused_bundle(tmp_path, monkeypatch):
    """A bundle folder whose manifest no loader accepts, in a folder without params.yaml (defaults)."""
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format": 999}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    return folder


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines and lines[-1].startswith("ragtune: "), err
    return lines[-1]


@pytest.mark.parametrize("argv", [
    ["serve", "{bundle}"],
    ["serve", "{bundle}", "--verify", "full"],
    ["ask", "a question", "--bundle", "{bundle}"],
    ["chat", "{bundle}"],
    ["serve", "{missing}"],
    ["route", "a question", "--router", "{missing}"],
])
def test_user_errors_are_one_line_and_exit_1(argv, refused_bundle, capsys):
    argv = [a.format(bundle=refused_bundle, missing=refused_bundle.parent / "absent") for a in argv]
    assert main(argv) == 1
    line = one_line_error(capsys)
    assert str(refused_bundle.parent) in line


def test_serve_refuses_another_host_without_a_token(refused_bundle, capsys, monkeypatch):
    for host in ("0.0.0.0", "::", "192.168.1.5"):
        assert main(["serve", str(refused_bundle), "--host", host]) == 1
        line = one_line_error(capsys)
        assert "refusing to serve" in line and "--insecure-no-token" in line and f"${TOKEN_ENV}" in line
    # with the flag, or with a token, it goes on (to the bundle, which is refused here)
    assert main(["serve", str(refused_bundle), "--host", "0.0.0.0", "--insecure-no-token"]) == 1
    assert "bundle format" in one_line_error(capsys)
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    assert main(["serve", str(refused_bundle), "--host", "0.0.0.0"]) == 1
    assert "bundle format" in one_line_error(capsys)
    assert main(["serve", str(refused_bundle), "--allow-host", "not a host"]) == 1
    assert "allowed_hosts" in one_line_error(capsys)


def test_chat_against_a_server_that_is_not_there(tmp_path, monkeypatch, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("hello\n"))
    assert main(["chat", "--url", f"http://127.0.0.1:{port}"]) == 1
    assert f"127.0.0.1:{port}" in one_line_error(capsys)


def test_the_command_itself_exits_1_with_one_line(refused_bundle):
    proc = subprocess.run([sys.executable, "-m", "ragtune.cli", "ask", "hi", "--bundle", str(refused_bundle)],
                          capture_output=True, text=True, timeout=120, check=False, cwd=refused_bundle.parent,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith("ragtune: ") and "bundle format 999" in proc.stderr
