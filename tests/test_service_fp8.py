"""The service on Qwen's FP8 layout (the tiny checkpoint of service.tiny_model --fp8), on the CPU:
the engine gives the greedy tokens of an engine on a float32 checkpoint of the dequantized
weights, alone and in a batch, and the real HTTP server answers the openai SDK on it."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from service.decode.fp8 import Fp8Linear, dequantize_linears
from service.engine import Engine
from service.engine.loading import load_model
from service.settings import ServiceSettings
from tests.conftest import SERVED_NAME, free_port, png_data_url, start_server
from tests.test_service_engine import PROMPTS, request


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory) -> Path:
    from service.tiny_model import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("tiny-fp8"), fp8=True)


@pytest.fixture(scope="module")
def dequantized_dir(fp8_dir, tmp_path_factory) -> Path:
    """A plain float32 checkpoint of the FP8 checkpoint's weights, dequantized (loaded by transformers)."""
    out = tmp_path_factory.mktemp("tiny-dequantized")
    model, _ = load_model(fp8_dir, torch.device("cpu"), torch.float32)
    dequantize_linears(model, torch.float32)
    model.save_pretrained(out)
    for source in fp8_dir.iterdir():  # tokenizer, processor and chat template files as they are
        if not source.name.startswith(("model", "config")):
            shutil.copy(source, out / source.name)
    return out


def engine_settings(model_dir: Path, **overrides) -> ServiceSettings:
    options = dict(model=str(model_dir), max_model_len=256, min_pixels=3136, max_pixels=16384, max_batch_size=4,
                   max_queue=16, warmup=False)
    return ServiceSettings(**{**options, **overrides})


@pytest.fixture(scope="module")
def engines(fp8_dir, dequantized_dir):
    pair = [Engine.load(engine_settings(fp8_dir)), Engine.load(engine_settings(dequantized_dir))]
    for engine in pair:
        engine.start()
    yield pair
    for engine in pair:
        engine.stop()


def test_the_fp8_engine_decodes_the_dequantized_models_greedy_tokens(engines):
    fp8, reference = engines
    assert isinstance(fp8.model.model.language_model.layers[0].mlp.down_proj, Fp8Linear)
    assert not any(isinstance(m, Fp8Linear) for m in reference.model.modules())
    expected = [reference.generate(request(reference, t, i, ignore_eos=True)).token_ids for t, i in PROMPTS]
    assert [fp8.generate(request(fp8, t, i, ignore_eos=True)).token_ids for t, i in PROMPTS] == expected
    with fp8.paused():  # all four in one batch
        handles = [fp8.submit(request(fp8, t, i, ignore_eos=True)) for t, i in PROMPTS]
    for handle in handles:
        list(handle)
    assert [h.token_ids for h in handles] == expected
    assert all(len(ids) == 24 for ids in expected)


def test_the_http_service_answers_on_the_fp8_checkpoint(fp8_dir):
    settings = ServiceSettings(model=str(fp8_dir), served_model_name=SERVED_NAME, host="127.0.0.1", port=free_port(),
                               max_model_len=512, min_pixels=3136, max_pixels=64 * 64 * 4, max_tokens_default=16,
                               api_key="k")
    running, stop = start_server(settings)
    try:
        client = running.client(api_key="k")
        assert [m.id for m in client.models.list().data] == [SERVED_NAME]
        reply = client.chat.completions.create(
            model=SERVED_NAME, max_tokens=12, temperature=0,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url()}},
                                                   {"type": "text", "text": "What is in this picture?"}]}])
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 10
        chunks = list(client.chat.completions.create(model=SERVED_NAME, max_tokens=6, temperature=0, stream=True,
                                                     messages=[{"role": "user", "content": "hi"}]))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    finally:
        stop()
