"""Shared fixtures: a tiny random Qwen3-VL built offline once, and the real server on 127.0.0.1.

Nothing here reaches the network: HF_HUB_OFFLINE is set for the whole session, the checkpoint is
written by `service.tiny_model`, and the server is the real uvicorn + FastAPI app + engine.
"""
from __future__ import annotations

import base64
import io
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

# Under `make test`, Docker is set up only when a selected test needs it (tests/docker_setup.py).
pytest_plugins = ["tests.docker_setup"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels (attention, skinny GEMM) run in Triton's own interpreter on a machine without a
# GPU: set before anything imports triton, which reads it when a kernel is defined.
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# `make test` exports VLKIT_VIA_MAKE=1 (the Makefile does for every command): messages would name
# make variables. Tests read them as a direct `vlkit` user does unless a test sets it itself.
os.environ.pop("VLKIT_VIA_MAKE", None)
# The tests run make themselves: `make test ARGS=-k...` would hand its ARGS (and any other of the
# Makefile's variables, with MAKEFLAGS) to every make a test starts, as the variables a user typed.
_MAKEFILE_VARIABLES = re.findall(r"^([A-Z_]+) =.*#: ", (Path(__file__).parents[1] / "Makefile").read_text(), re.M)
for _name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", *_MAKEFILE_VARIABLES):
    os.environ.pop(_name, None)

API_KEY = "test-key"
SERVED_NAME = "tiny-qwen3-vl"


def png_data_url(width: int = 96, height: int = 64, color=(200, 30, 30), fmt: str = "PNG") -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, fmt)
    mime = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}[fmt]
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from service.tiny_model import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("tiny-qwen3-vl"))


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("media")
    Image.new("RGB", (80, 60), (20, 40, 200)).save(root / "blue.png")
    return root


@dataclass
class RunningServer:
    base_url: str
    settings: object
    app: object

    @property
    def engine(self):
        return self.app.state.service.engine

    @property
    def metrics(self):
        return self.app.state.service.metrics

    def client(self, **kwargs):
        from openai import OpenAI

        kwargs.setdefault("api_key", API_KEY)
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 60)
        return OpenAI(base_url=self.base_url + "/v1", **kwargs)


def running_engine(model_dir, **settings):
    """An engine on the tiny model with these settings, started; stopped when the generator ends
    (a module fixture's body: `yield from running_engine(...)`)."""
    from service.engine import Engine
    from service.settings import ServiceSettings

    engine = Engine.load(ServiceSettings(model=str(model_dir), min_pixels=3136, max_pixels=16384, **settings))
    engine.start()
    yield engine
    engine.stop()


def start_server(settings, sockets=None) -> tuple[RunningServer, callable]:
    """The real app under uvicorn in a thread (on `sockets` when given, as `python -m service` binds
    its own); returns once /health/ready says ready."""
    from service.api import create_app
    from service.http_limits import uvicorn_server
    from service.readiness import wait_ready

    app = create_app(settings)
    server = uvicorn_server(app, settings)
    thread = threading.Thread(target=server.run, kwargs={"sockets": sockets}, name="uvicorn", daemon=True)
    thread.start()
    base = f"http://{settings.host}:{settings.port}"
    if not wait_ready(base, 60, poll=0.05):
        server.should_exit = True
        raise RuntimeError(f"server did not become ready: {app.state.service.load_error}")

    def stop() -> None:
        server.should_exit = True
        thread.join(30)

    return RunningServer(base, settings, app), stop


@pytest.fixture(scope="session")
def server(tiny_model_dir, media_dir) -> RunningServer:
    from service.settings import ServiceSettings

    settings = ServiceSettings(
        model=str(tiny_model_dir), served_model_name=SERVED_NAME, host="127.0.0.1", port=free_port(),
        max_model_len=512, min_pixels=3136, max_pixels=64 * 64 * 4, max_images_per_request=3,
        max_image_bytes=2 * 1024 * 1024, max_request_bytes=8 * 1024 * 1024, max_tokens_default=32,
        max_batch_size=8, max_queue=8, api_key=API_KEY, allowed_media_dir=media_dir, log_level="warning",
        head_timeout_seconds=2, body_timeout_seconds=3,
    )
    running, stop = start_server(settings)
    yield running
    stop()


@pytest.fixture(scope="session")
def long_context_server(tiny_model_dir, media_dir) -> RunningServer:
    """The same server with room for what tools and client libraries put in the prompt (tool
    definitions, schemas in the instructions): the tiny tokenizer spends a token on 2-3 characters."""
    from service.settings import ServiceSettings

    settings = ServiceSettings(
        model=str(tiny_model_dir), served_model_name=SERVED_NAME, host="127.0.0.1", port=free_port(),
        max_model_len=4096, min_pixels=3136, max_pixels=64 * 64 * 4, max_images_per_request=2,
        max_batch_size=8, max_queue=16, api_key=API_KEY, allowed_media_dir=media_dir,
    )
    running, stop = start_server(settings)
    yield running
    stop()
