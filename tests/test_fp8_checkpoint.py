"""Qwen's FP8 checkpoint layout, written by service.tiny_model --fp8 and read by the engine's loader
offline, on the CPU: names, dtypes, config, shards, tied embeddings, refusals, and the model's
own forward against the same model with the weights dequantized."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from service.decode.fp8 import FP8_DTYPE, Fp8Linear, dequantize_linears
from service.engine.loading import load_model
from service.errors import ModelUnavailable

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory) -> Path:
    """Written by the CLI, as a user would: ``python -m service.tiny_model OUT --fp8``."""
    out = tmp_path_factory.mktemp("tiny-fp8") / "ckpt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "service.tiny_model", str(out), "--fp8"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


def tensors(path: Path) -> dict[str, tuple[str, list[int]]]:
    found = {}
    index = path / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    for name in files:
        with safe_open(str(path / name), "pt") as f:
            for key in f.keys():
                found[key] = (f.get_slice(key).get_dtype(), f.get_slice(key).get_shape())
    return found


def test_the_fp8_checkpoint_has_qwens_names_dtypes_and_config(fp8_dir, tiny_model_dir):
    config = json.loads((fp8_dir / "config.json").read_text())
    quant = config["quantization_config"]
    assert {k: quant[k] for k in ("quant_method", "fmt", "weight_block_size", "activation_scheme")} == {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    assert "lm_head" in quant["modules_to_not_convert"]
    assert "model.visual.blocks.0.attn.qkv" in quant["modules_to_not_convert"]
    found, plain = tensors(fp8_dir), tensors(tiny_model_dir)
    scales = {k for k in found if k.endswith(".weight_scale_inv")}
    # The same tensor names as the bf16 checkpoint, plus one scale per decoder linear.
    assert set(found) - scales == set(plain)
    assert scales == {f"model.language_model.layers.{i}.{name}.weight_scale_inv" for i in range(2) for name in LINEARS}
    for key, (dtype, shape) in found.items():
        if key in scales:
            weight_shape = found[key.replace("_scale_inv", "")][1]
            assert dtype == "F32" and shape == [-(-weight_shape[0] // 128), -(-weight_shape[1] // 128)], key
        elif key.replace(".weight", ".weight_scale_inv") in scales:
            assert dtype == "F8_E4M3" and shape == plain[key][1], key
        else:
            assert dtype == "BF16", key  # vision tower, embeddings, norms, lm_head
    assert found["model.language_model.layers.0.mlp.gate_proj.weight_scale_inv"][1] == [2, 1]  # two row blocks
    assert found["model.language_model.layers.0.mlp.down_proj.weight_scale_inv"][1] == [1, 2]  # two column blocks


def test_the_loader_keeps_fp8_weights_and_runs_transformers_forward_as_the_dequantized_model(fp8_dir):
    model, fp8 = load_model(fp8_dir, CPU, torch.float32)
    assert fp8
    text = model.model.language_model
    fp8_modules = [m for m in text.modules() if isinstance(m, Fp8Linear)]
    assert len(fp8_modules) == 2 * len(LINEARS)
    assert not any(type(m) is nn.Linear for m in text.layers.modules())
    assert all(m.weight.dtype == FP8_DTYPE and m.weight_scale_inv.dtype == torch.float32 for m in fp8_modules)
    # One byte per FP8 weight: the parameters hold no full-precision copy of them.
    stored = sum(m.weight.numel() for m in fp8_modules)
    assert sum(p.numel() * p.element_size() for m in fp8_modules for p in m.parameters()) < 1.01 * stored
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.model.visual.rotary_pos_emb.inv_freq.device == CPU
    reference, _ = load_model(fp8_dir, CPU, torch.float32)
    dequantize_linears(reference, torch.float32)
    ids = torch.tensor([[5, 40, 41, 300, 12, 7]])
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_the_stored_fp8_weights_stand_for_the_random_weights_they_were_made_from(fp8_dir, tiny_model_dir):
    """Both checkpoints come from the same seed: dequantized FP8 = the float32 weights to e4m3's rounding."""
    model, _ = load_model(fp8_dir, CPU, torch.float32)
    dequantize_linears(model, torch.float32)
    original, _ = load_model(tiny_model_dir, CPU, torch.float32)
    weights = dict(original.named_parameters())
    for name, restored in model.named_parameters():
        source = weights[name]
        if name.split(".")[-2] in {n.split(".")[-1] for n in LINEARS}:
            # half an e4m3 step (1/16 of the value), or of a subnormal step below 2**-6 of the block scale
            assert ((restored - source).abs() <= source.abs() / 16 + source.abs().max() * 2.0**-12).all(), name
        else:  # stored as bf16
            assert torch.equal(restored, source.bfloat16().float()), name


def test_a_sharded_checkpoint_with_an_index_loads_the_same(fp8_dir, tmp_path):
    from service.tiny_model import build_checkpoint

    sharded = build_checkpoint(tmp_path / "sharded", fp8=True, shard_bytes=64 * 1024)
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    assert tensors(sharded) == tensors(fp8_dir)
    one, _ = load_model(fp8_dir, CPU, torch.float32)
    many, _ = load_model(sharded, CPU, torch.float32)
    for (name, a), (_, b) in zip(one.state_dict().items(), many.state_dict().items()):
        assert torch.equal(a.float(), b.float()), name


def test_tied_embeddings_are_stored_once_and_tied_again(tmp_path):
    from service.tiny_model import build_config, build_model, build_tokenizer, write_fp8_checkpoint, write_processor

    tokenizer = build_tokenizer(qwen_ids=False)
    config = build_config("tiny", tokenizer)
    config.tie_word_embeddings = True  # as in Qwen3-VL-2B and 4B
    write_fp8_checkpoint(build_model(config), tmp_path)
    write_processor(tmp_path, tokenizer)
    assert "lm_head.weight" not in tensors(tmp_path)
    model, _ = load_model(tmp_path, CPU, torch.float32)
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_a_bf16_checkpoint_is_quantized_while_loading_as_the_fp8_writer_does(tiny_model_dir, tmp_path):
    from service.decode.fp8 import dequantize_gemm, decoder_linear_names, quantize_linears

    model, fp8 = load_model(tiny_model_dir, CPU, torch.float32, quantize="fp8")
    assert fp8 and isinstance(model.model.language_model.layers[1].mlp.down_proj, Fp8Linear)
    plain, stored_fp8 = load_model(tiny_model_dir, CPU, torch.float32)
    assert not stored_fp8 and type(plain.model.language_model.layers[1].mlp.down_proj) is nn.Linear
    quantize_linears(plain, decoder_linear_names(plain), dequantize_gemm)
    for (name, a), (_, b) in zip(model.state_dict().items(), plain.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a.float(), b.float()), name


def edited_copy(source: Path, target: Path, config_edit=None, tensor_edit=None) -> Path:
    shutil.copytree(source, target)
    if config_edit:
        config = json.loads((target / "config.json").read_text())
        config_edit(config)
        (target / "config.json").write_text(json.dumps(config))
    if tensor_edit:
        from safetensors.torch import load_file, save_file

        state = load_file(target / "model.safetensors")
        tensor_edit(state)
        save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["quantization_config"].update(quant_method="awq"), "quantized with 'awq'"),
    (lambda c: c["quantization_config"].update(weight_block_size=[64, 64]), r"weight_block_size \[64, 64\]"),
    (lambda c: c["quantization_config"].update(activation_scheme="static"), "activation_scheme 'static'"),
    (lambda c: c["quantization_config"].update(fmt="e5m2"), "fmt 'e5m2'"),
])
def test_other_quantization_schemes_are_refused_by_name(fp8_dir, tmp_path, edit, message):
    broken = edited_copy(fp8_dir, tmp_path / "ckpt", config_edit=edit)
    with pytest.raises(ModelUnavailable, match=message):
        load_model(broken, CPU, torch.float32)


KEY = "model.language_model.layers.0.mlp.up_proj"


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop(f"{KEY}.weight_scale_inv"), "float8_e4m3fn but the checkpoint has no"),
    (lambda s: s.update({f"{KEY}.weight": s[f"{KEY}.weight"].float()}), "not float8_e4m3fn, though it has block"),
    (lambda s: s.update({f"{KEY}.weight_scale_inv": s[f"{KEY}.weight_scale_inv"][:1]}), "has shape"),
    (lambda s: s.pop("model.language_model.norm.weight"), "lacks 1 weight"),
    (lambda s: s.update({"model.language_model.extra.weight": torch.zeros(2)}), "has no place for"),
])
def test_broken_fp8_checkpoints_are_refused_with_the_tensor_named(fp8_dir, tmp_path, edit, message):
    broken = edited_copy(fp8_dir, tmp_path / "ckpt", tensor_edit=edit)
    with pytest.raises(ModelUnavailable, match=message):
        load_model(broken, CPU, torch.float32)


def test_nf4_is_for_bf16_checkpoints_on_cuda(fp8_dir, tiny_model_dir):
    with pytest.raises(ModelUnavailable, match="FP8 checkpoint; --quantization nf4 quantizes bf16"):
        load_model(fp8_dir, CPU, torch.float32, quantize="nf4")
    with pytest.raises(ModelUnavailable, match="nf4 needs a CUDA GPU"):
        load_model(tiny_model_dir, CPU, torch.float32, quantize="nf4")
