"""`make status`, `down` and `logs` say what runs, and say so when nothing does: a vlkit service
started without Docker (the real server of tests/conftest.py, on 127.0.0.1) is named, not "not running"."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import API_KEY, SERVED_NAME, free_port
from tests.docker_helpers import ROOT, require_engine


def _vlkit(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "VLKIT_PROJECT": f"vlkit-nothing-{os.getpid()}", "VLKIT_VIA_MAKE": "1", **env}
    return subprocess.run([sys.executable, "-m", "scripts", *args], cwd=ROOT, capture_output=True, text=True,
                          env=full, timeout=120)


def _port(server) -> str:
    return server.base_url.rsplit(":", 1)[1]


def test_status_without_docker_names_the_service_that_answers(server, tmp_path):
    no_docker = tmp_path / "bin"
    no_docker.mkdir()
    res = _vlkit("status", "--port", _port(server), PATH=str(no_docker), VLKIT_API_KEY=API_KEY)
    assert res.returncode == 0, res.stderr
    assert "docker is not installed" in res.stdout
    assert f"127.0.0.1:{_port(server)} answers: vlkit's service (model {SERVED_NAME}, ready)" in res.stdout
    assert "not started by `make up`" in res.stdout
    assert f"`make caption IMG=photo.jpg PORT={_port(server)}` talks to it" in res.stdout  # on that port
    assert "not running" not in res.stdout
    # Without the API key the model list is refused, and the service is still recognised.
    keyless = _vlkit("status", "--port", _port(server), PATH=str(no_docker))
    assert "answers: vlkit's service (ready)" in keyless.stdout


def test_status_says_when_nothing_answers(tmp_path):
    res = _vlkit("status", "--port", str(free_port()), PATH=str(tmp_path))
    assert res.returncode == 0 and "docker is not installed" in res.stdout
    assert "answers" not in res.stdout


@pytest.mark.docker
def test_status_down_and_logs_with_no_container(server):
    require_engine()
    port = _port(server)
    status = _vlkit("status", "--port", port)
    assert status.returncode == 0
    assert f"127.0.0.1:{port} answers: vlkit's service" in status.stdout
    down = _vlkit("down", VLKIT_PORT=port)
    assert down.returncode == 0 and "nothing to stop: no vlkit container exists" in down.stdout
    assert f"127.0.0.1:{port} answers: vlkit's service" in down.stdout  # ... and where to stop that one
    logs = _vlkit("logs", "--no-follow", VLKIT_PORT=port)
    assert logs.returncode == 1 and "no vlkit container, so no logs" in logs.stderr
    assert "its logs are in the terminal that runs it" in logs.stderr
    nothing = _vlkit("logs", "--no-follow", VLKIT_PORT=str(free_port()))
    assert "`make up` starts one" in nothing.stderr
    quiet = _vlkit("status", "--port", str(free_port()))
    assert "vlkit is not running, and nothing answers on 127.0.0.1:" in quiet.stdout


@pytest.mark.parametrize("command", [["status"], ["caption", "photo.jpg"],
                                     ["up", "--dry-run", "--gpu-memory", "8GiB"]])
def test_a_bad_vlkit_port_is_a_clear_error_naming_the_variable(tmp_path, command):
    """VLKIT_PORT is read by every command that needs a port; a typo in it is said, not a traceback."""
    res = _vlkit(*command, PATH=str(tmp_path), VLKIT_PORT="80a0")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "VLKIT_PORT='80a0'" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("fmt, name", [("WEBP", "photo"), ("PNG", "download (1)"), ("JPEG", "scan.jpg.part")])
def test_caption_reads_what_the_image_is_not_what_its_name_says(server, tmp_path, fmt, name):
    """A saved image without its extension (browsers, phones) is still the image: the real service captions it."""
    from PIL import Image

    img = tmp_path / name
    Image.new("RGB", (64, 48), (20, 120, 200)).save(img, format=fmt)
    res = _vlkit("caption", str(img), "--port", _port(server), VLKIT_API_KEY=API_KEY)
    assert res.returncode == 0, res.stderr
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    refused = _vlkit("caption", str(text), "--port", _port(server), VLKIT_API_KEY=API_KEY)
    assert refused.returncode == 1 and "not an image (type text/plain)" in refused.stderr


def test_status_does_not_offer_caption_for_a_program_that_is_not_the_api(tmp_path):
    """Another web server on the port: caption cannot talk to it; the way on is another port."""
    import http.server
    import threading

    other = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        port = other.server_address[1]
        res = _vlkit("status", "--port", str(port), PATH=str(tmp_path))
    finally:
        other.shutdown()
    assert f"127.0.0.1:{port} answers: a program that is not vlkit" in res.stdout, res.stdout
    assert "make caption" not in res.stdout and f"`make up PORT={port + 1}`" in res.stdout


def test_a_port_whose_server_just_stopped_is_free_though_its_connections_linger():
    """A server stopped a moment ago leaves its closed connections in TIME_WAIT for a minute; Docker
    (SO_REUSEADDR) binds the port anyway, so `up` and the doctor must not call it taken."""
    import socket

    from scripts.stack.client import port_free

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    assert not port_free(port)  # listening: taken
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server side closes first: its end waits in TIME_WAIT
    client.close()
    server.close()
    assert port_free(port)


def test_caption_of_an_image_over_the_request_limit_says_the_services_refusal(server, tmp_path):
    """The service answers a body over its limit with a 413 before reading it, and closes the
    connection; the caption still reports that answer (as curl and the openai SDK do), not 'no
    vlkit service answers' about a service that is up."""
    big = tmp_path / "huge.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(server.settings.max_request_bytes))
    res = _vlkit("caption", str(big), "--port", _port(server), VLKIT_API_KEY=API_KEY)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "the service answered 413" in res.stderr and "the limit is" in res.stderr, res.stderr
    assert "no vlkit service answers" not in res.stderr


def test_caption_and_status_reach_127_0_0_1_past_a_proxy_in_the_environment(server, tmp_path):
    """A shell with HTTP_PROXY set (a corporate network) must not send the host's requests to the
    local API through that proxy: here the proxy is a port nothing listens on."""
    from PIL import Image

    img = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(img)
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    proxied = {name: dead_proxy for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")}
    res = _vlkit("caption", str(img), "--port", _port(server), VLKIT_API_KEY=API_KEY, **proxied)
    assert res.returncode == 0, res.stderr
    status = _vlkit("status", "--port", _port(server), PATH=str(tmp_path), VLKIT_API_KEY=API_KEY, **proxied)
    assert "answers: vlkit's service (model" in status.stdout, status.stdout


def test_caption_of_a_folder_says_it_is_a_folder(tmp_path):
    """IMG=photos/ (the folder, not a file in it) exists: 'no such image file' would send the user
    looking for a typo."""
    res = _vlkit("caption", str(tmp_path), "--port", str(free_port()))
    assert res.returncode == 1
    assert f"{tmp_path} is a folder; give one image file in it" in res.stderr, res.stderr
