"""The offline checkpoint builder and the processor loading path (with or without torchvision)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from service.engine.loading import load_processor
from service.model_shapes import QWEN_SPECIAL_BASE_ID, SHAPES
from service.tiny_model import build_config, build_tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_cli_writes_a_checkpoint_that_auto_classes_load_offline(tmp_path):
    out = tmp_path / "tiny"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "service.tiny_model", str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "preprocessor_config.json", "video_preprocessor_config.json", "chat_template.jinja"} <= names
    # readable by the container's user, as `make up PROFILE=8gb MODEL=<folder>` needs (save_pretrained: 0600)
    assert all(p.stat().st_mode & 0o444 == 0o444 for p in [out, *out.rglob("*")])

    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = load_processor(out)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def test_same_seed_same_files(tiny_model_dir, tmp_path):
    from service.tiny_model import build_checkpoint

    again = build_checkpoint(tmp_path / "again")

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert digest(tiny_model_dir / name) == digest(again / name), name


def test_processor_renders_qwen_chat_and_expands_image_tokens(tiny_model_dir):
    from PIL import Image

    processor = load_processor(tiny_model_dir)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n")
    inputs = processor(text=[text], images=[Image.new("RGB", (64, 32))], return_tensors="pt",
                       min_pixels=1024, max_pixels=64 * 32)
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert inputs["image_grid_thw"].tolist() == [[1, 2, 4]]  # 16 px patches
    assert int((inputs["input_ids"] == pad).sum()) == 2  # merged 2x2
    assert processor.tokenizer.decode(processor.tokenizer("a cat on a wall")["input_ids"]) == "a cat on a wall"


def test_without_torchvision_the_processor_is_built_without_video(tiny_model_dir):
    from transformers.utils import is_torchvision_available

    processor = load_processor(tiny_model_dir)
    if is_torchvision_available():
        assert type(processor).__name__ == "Qwen3VLProcessor"
        assert processor.video_processor is not None
    else:
        from transformers import AutoProcessor

        with pytest.raises(ImportError):  # why the fallback exists
            AutoProcessor.from_pretrained(tiny_model_dir)
        assert type(processor).__name__ == "Qwen3VLProcessorImageOnly"
        assert not hasattr(processor, "video_processor")


def test_real_size_tokenizer_uses_qwen_ids(qwen_tokenizer):
    tok = qwen_tokenizer
    assert tok.convert_tokens_to_ids("<|endoftext|>") == QWEN_SPECIAL_BASE_ID == 151643
    assert tok.convert_tokens_to_ids("<|vision_start|>") == 151652
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert tok.convert_tokens_to_ids("</think>") == 151668
    assert tok.decode(tok("describe the picture")["input_ids"]) == "describe the picture"


@pytest.fixture(scope="module")
def qwen_tokenizer():
    return build_tokenizer(qwen_ids=True)


@pytest.mark.parametrize("shape,billions", [("2b", 2.13), ("4b", 4.44), ("8b", 8.77)])
def test_real_shapes_have_the_published_sizes(shape, billions, qwen_tokenizer):
    from transformers import Qwen3VLForConditionalGeneration

    config = build_config(shape, qwen_tokenizer)
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    assert abs(params - billions) / billions < 0.03, params
    text = json.loads(config.to_json_string())["text_config"]
    assert sum(text["rope_parameters"]["mrope_section"]) * 2 == text["head_dim"]
    assert config.image_token_id == 151655


def test_tiny_shape_meets_the_config_constraints():
    tiny = SHAPES["tiny"]
    text, vision = tiny["text_config"], tiny["vision_config"]
    assert sum(text["rope_parameters"]["mrope_section"]) * 2 == text["head_dim"]
    assert int(vision["num_position_embeddings"] ** 0.5) ** 2 == vision["num_position_embeddings"]
