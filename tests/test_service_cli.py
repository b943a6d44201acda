"""`python -m service`: flags from ServiceSettings, clear start-up errors, a real start and graceful stop."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from service.__main__ import build_parser, settings_from_args
from service.readiness import wait_ready
from service.settings import ServiceSettings
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]


def as_from_a_terminal() -> None:
    """SIGINT as a terminal's shell leaves it, whatever the test runner's parent did: a job a
    non-interactive shell starts in the background inherits it ignored, and Python then installs no
    KeyboardInterrupt handler (Ctrl-C tests would test nothing there)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_service(args: list[str], env: dict | None = None, entry: list[str] = ("-m", "service"),
                **kwargs) -> subprocess.Popen:
    """The service as a process: `python -m service ARGS` (`entry`: how Python is told to start it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.Popen([sys.executable, *entry, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=as_from_a_terminal, **kwargs)


def refusal(args: list[str], env: dict | None = None) -> tuple[int | None, str]:
    """Exit status and output of a start that should be refused at once; one that starts serving
    instead is killed (its status then None), so the test fails without waiting on it."""
    proc = run_service(args, env)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return None, proc.communicate()[0]
    return proc.returncode, out


def test_every_setting_has_a_flag():
    flags = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert flags == set(ServiceSettings.model_fields)


def test_flags_override_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VLKIT_PORT", "9001")
    monkeypatch.setenv("VLKIT_MAX_PIXELS", "500000")
    settings = settings_from_args(["--port", "9002", "--no-warmup", "--allowed-media-dir", str(tmp_path)])
    assert settings.port == 9002  # flag beats env
    assert settings.max_pixels == 500000  # env beats default
    assert settings.warmup is False and settings.allowed_media_dir == tmp_path
    assert settings.host == "127.0.0.1"


def test_env_file_is_read_when_the_settings_are_made(monkeypatch, tmp_path):
    env_file = tmp_path / "vlkit.env"
    env_file.write_text("# settings\nVLKIT_PORT=9001\nexport VLKIT_MAX_PIXELS=500000\n")
    monkeypatch.setenv("VLKIT_ENV_FILE", str(env_file))
    monkeypatch.setenv("VLKIT_PORT", "9002")
    settings = settings_from_args(["--max-model-len", "4096"])
    assert (settings.port, settings.max_pixels, settings.max_model_len) == (9002, 500000, 4096)  # env over file


@pytest.mark.parametrize(("text", "said"), [
    (None, ": cannot read it: No such file or directory"),
    ("VLKIT_PORT=9001\n\n# comment\nVLKIT_MAX_PIXELS 500000\n", ", line 4: cannot be parsed (want NAME=value)"),
])
def test_env_file_missing_or_malformed_is_a_settings_error(tiny_model_dir, tmp_path, text, said):
    """A missing VLKIT_ENV_FILE was ignored, and a line python-dotenv cannot parse dropped with only
    its warning: the settings in them silently kept their defaults."""
    env_file = tmp_path / "vlkit.env"
    if text is not None:
        env_file.write_text(text)
    status, out = refusal(["--model", str(tiny_model_dir), "--port", str(free_port())],
                          env={"VLKIT_ENV_FILE": str(env_file)})
    assert status == 2 and out.strip() == f"error: VLKIT_ENV_FILE {env_file}{said}", out


def test_model_missing_from_cache_says_how_to_download(tmp_path):
    proc = run_service(["--model", "Qwen/Qwen3-VL-2B-Instruct"], env={"HF_HUB_CACHE": str(tmp_path)})
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "not in the local Hugging Face cache" in out
    assert "make download MODEL=Qwen/Qwen3-VL-2B-Instruct" in out


@pytest.mark.parametrize(("args", "env", "said"), [
    (["--max-batch-size", "0"], {}, "error: --max-batch-size / VLKIT_MAX_BATCH_SIZE: Input should be greater than or equal to 1 (got 0)"),
    ([], {"VLKIT_MAX_MODEL_LEN": "abc"}, "error: --max-model-len / VLKIT_MAX_MODEL_LEN: Input should be a valid integer"),
    (["--max-pixels", "50000"], {}, "error: --min-pixels / VLKIT_MIN_PIXELS: 65536 is above --max-pixels 50000"),
    (["--model", ""], {}, "error: --model / VLKIT_MODEL: is empty"),  # was read as the current folder
    # argparse's own refusals printed the whole usage (~30 lines of flags) before them
    (["--max-modle-len", "8"], {}, "error: unrecognized arguments: --max-modle-len 8 (`python -m service --help`"),
    (["--port", "abc"], {}, "error: argument --port: invalid int value: 'abc' (`python -m service --help`"),
])
def test_a_bad_setting_is_one_line_naming_it_before_anything_loads(tiny_model_dir, args, env, said):
    """Range checks and VLKIT_* values went through pydantic to a 21-line traceback; min_pixels over
    max_pixels was found only at warm-up, after the model loaded, as a request field's error."""
    proc = run_service(["--model", str(tiny_model_dir), *args], env=env)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and said in out and "Traceback" not in out, out
    assert len(out.strip().splitlines()) == 1


@pytest.mark.parametrize(("name", "said"), [
    ("no-such-dir", "no such directory"),
    ("config.json", "is a file, not a directory"),
    ("", "is empty: give a directory, or leave it unset to refuse local image files"),
])
def test_allowed_media_dir_that_is_no_directory_is_a_settings_error(tiny_model_dir, name, said):
    """It was accepted, and every file:// image then failed, request by request ('' was the current folder)."""
    given = str(tiny_model_dir / name) if name else ""
    status, out = refusal(["--model", str(tiny_model_dir), "--port", str(free_port()), "--allowed-media-dir", given])
    assert status == 2 and "Traceback" not in out, out
    assert out.strip() == f"error: --allowed-media-dir / VLKIT_ALLOWED_MEDIA_DIR: {said} (got {given!r})"


@pytest.mark.parametrize("given", [["--compile-cache-dir", ""], ["--compile-cache-dir", " "]])
def test_an_empty_compile_cache_dir_is_a_settings_error(tiny_model_dir, given):
    """'' was Path(''), the current folder, which then filled with TorchInductor's and Triton's caches."""
    status, out = refusal(["--model", str(tiny_model_dir), "--port", str(free_port()), *given])
    assert status == 2 and out.strip() == ("error: --compile-cache-dir / VLKIT_COMPILE_CACHE_DIR: is empty: give a "
                                           f"directory, or leave it unset for ~/.cache/vlkit/compile (got {given[1]!r})"), out


def test_an_empty_compile_cache_dir_in_the_environment_is_refused_too(tiny_model_dir):
    status, out = refusal(["--model", str(tiny_model_dir), "--port", str(free_port())],
                          env={"VLKIT_COMPILE_CACHE_DIR": ""})
    assert status == 2 and "error: --compile-cache-dir / VLKIT_COMPILE_CACHE_DIR: is empty" in out, out


DEFAULT_CACHE = Path.home() / ".cache/vlkit/compile"


@pytest.mark.parametrize("env, inductor, triton", [
    ({"VLKIT_COMPILE_CACHE_DIR": "/c", "TORCHINDUCTOR_CACHE_DIR": "/t"}, "/c/inductor", "/c/triton"),  # ours wins
    ({"TORCHINDUCTOR_CACHE_DIR": "/t"}, "/t", str(DEFAULT_CACHE / "triton")),  # torch's own, set by the user, stays
    ({}, str(DEFAULT_CACHE / "inductor"), str(DEFAULT_CACHE / "triton")),
])
def test_the_compile_cache_is_where_the_settings_say(monkeypatch, env, inductor, triton):
    from service.engine.startup import configure_torch

    for name in ("VLKIT_COMPILE_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, "")  # so that the teardown restores it as it was, absent too
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # it sets a default there too
    configure_torch(ServiceSettings())
    assert (os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"]) == (inductor, triton)


def test_max_model_len_above_the_models_maximum_is_refused_before_the_weights_load(tiny_model_dir, monkeypatch):
    """It was clamped to the model's maximum without a word; vLLM refuses it ("User-specified
    max_model_len ... is greater than the derived max_model_len"), and so does the service now."""
    import json

    from service.engine import loading
    from service.errors import ModelUnavailable

    config = json.loads((tiny_model_dir / "config.json").read_text())
    limit = config["text_config"]["max_position_embeddings"]
    said = (f"--max-model-len / VLKIT_MAX_MODEL_LEN: {limit + 1} is greater than the model's maximum context of "
            f"{limit} tokens (max_position_embeddings in {tiny_model_dir.resolve() / 'config.json'}; vLLM refuses "
            f"it too): give {limit} or less")
    status, out = refusal(["--model", str(tiny_model_dir), "--port", str(free_port()), "--max-model-len", str(limit + 1)])
    assert status == 2 and out.strip() == f"error: {said}", out

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights load")

    monkeypatch.setattr(loading, "load_model", no_weights)  # Engine.load and the app's load too
    with pytest.raises(ModelUnavailable) as refused:
        loading.load(ServiceSettings(model=str(tiny_model_dir), max_model_len=limit + 1))
    assert str(refused.value) == said


def test_an_engine_given_a_loaded_model_refuses_a_context_above_its_maximum_too(tiny_model_dir):
    """A model loaded elsewhere (the benchmarks build the Engine from their own) was clamped there."""
    import json

    from service.engine import Engine, loading
    from service.errors import ModelUnavailable

    limit = json.loads((tiny_model_dir / "config.json").read_text())["text_config"]["max_position_embeddings"]
    loaded = loading.load(ServiceSettings(model=str(tiny_model_dir), device="cpu", max_model_len=limit))
    with pytest.raises(ModelUnavailable, match=f"{limit + 1} is greater than the model's maximum context of {limit}"):
        Engine(ServiceSettings(model=str(tiny_model_dir), device="cpu", max_model_len=limit + 1), loaded)


EXPOSED = ("--host {host}: the API is reachable from the network without an API key (anyone who reaches port "
           "{port} can use it; in a container, wherever its port is published): set --api-key / VLKIT_API_KEY to "
           "require one")


@pytest.mark.parametrize(("host", "api_key", "warned"), [
    ("0.0.0.0", None, True), ("::", None, True), ("192.168.1.20", None, True), ("my-host.example", None, True),
    ("", None, True), ("0.0.0.0", "key", False), ("127.0.0.1", None, False), ("127.0.0.2", None, False),
    ("::1", None, False), ("localhost", None, False),
])
def test_exposure_warning_is_for_addresses_others_may_reach_without_a_key(host, api_key, warned):
    from service.__main__ import exposure_warning

    said = exposure_warning(ServiceSettings(host=host, port=8123, api_key=api_key))
    assert said == (EXPOSED.format(host=host, port=8123) if warned else None)


@pytest.mark.parametrize(("published", "warned"), [("127.0.0.1", False), ("::1", False), ("0.0.0.0", True),
                                                   ("192.168.1.20", True)])
def test_in_a_container_the_published_address_decides_the_warning(published, warned):
    """vlkit's compose binds 0.0.0.0 in the container and publishes the port on the host's loopback
    (VLKIT_PUBLISHED_HOST=127.0.0.1): every `make up` without a key logged that the network could reach
    the API, which it could not."""
    from service.__main__ import exposure_warning

    said = exposure_warning(ServiceSettings(host="0.0.0.0", published_host=published, port=8000))
    assert said == (EXPOSED.replace("--host", "--published-host").format(host=published, port=8000)
                    if warned else None)


@pytest.mark.parametrize("api_key", [None, "key"])
def test_a_bind_others_can_reach_without_an_api_key_is_warned_about_at_start_up(tmp_path, api_key):
    """It was not. The model here is no checkpoint, so the start stops right after the warning: nothing
    listens on a public address in the test."""
    port = free_port()
    status, out = refusal(["--model", str(tmp_path), "--host", "0.0.0.0", "--port", str(port),
                           *(["--api-key", api_key] if api_key else [])])
    *before, last = out.strip().splitlines()
    assert status == 2 and "no config.json" in last, out
    assert [line.split(" ", 2)[2] for line in before] == (
        [] if api_key else ["WARNING service: " + EXPOSED.format(host="0.0.0.0", port=port)])


def test_model_path_that_is_no_checkpoint_is_refused(tmp_path):
    proc = run_service(["--model", str(tmp_path)])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "no config.json" in out


def test_starts_answers_and_stops_gracefully(tiny_model_dir):
    port = free_port()
    proc = run_service(["--model", str(tiny_model_dir), "--port", str(port), "--served-model-name", "tiny",
                        "--max-model-len", "256", "--log-level", "info"])
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_ready(base, 120, alive=lambda: proc.poll() is None), proc.stdout.read()
        from openai import OpenAI

        reply = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    # uvicorn shuts down (lifespan included: the engine stops), then re-raises the signal it caught.
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out


def test_ctrl_c_stops_it_as_uvicorn_does_without_a_traceback(tiny_model_dir):
    """Ctrl-C (SIGINT) is the way to stop it in a terminal: the same graceful shutdown, exit status 0,
    and no KeyboardInterrupt traceback (uvicorn re-raises the signal it caught once it has shut down)."""
    port = free_port()
    proc = run_service(["--model", str(tiny_model_dir), "--port", str(port), "--max-model-len", "256",
                        "--no-warmup", "--log-level", "info"])
    try:
        assert wait_ready(f"http://127.0.0.1:{port}", 120, alive=lambda: proc.poll() is None), proc.stdout.read()
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert "Application shutdown complete" in out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert proc.returncode == 0, out


def test_service_doc_lists_every_setting():
    from service.__main__ import settings_table

    assert settings_table() in (REPO / "docs" / "SERVICE.md").read_text(encoding="utf-8")


def test_hub_id_resolves_from_the_local_cache_offline(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants

    from service.engine.loading import resolve_model_path

    commit = "0" * 40
    repo = tmp_path / "models--vlkit--tiny-qwen3-vl"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_model_path("vlkit/tiny-qwen3-vl") == repo / "snapshots" / commit
