"""Qwen's -FP8 checkpoints, loaded without transformers' FP8 integration.

transformers 5.17 sends a checkpoint whose ``quantization_config.quant_method`` is ``fp8`` through
its FineGrainedFP8 quantizer: on a GPU of compute capability 8.9+ its ``FP8Linear`` fetches a
Triton kernel from the Hugging Face hub (the ``kernels`` package) at the first forward, which
fails offline and in the image; elsewhere (CPU, Turing, Ampere) it dequantizes every weight to
bf16 at load, twice the memory. Here the model is built from its config with that section left
out, parameters on the meta device; the linears that have a ``weight_scale_inv`` in the
checkpoint become :class:`Fp8Linear`; then every tensor of the safetensors files is read straight
onto the device: FP8 weights and float32 scales as stored, everything else in the engine's dtype.
A bf16 checkpoint loads the same way with ``quantize``: each decoder linear's weight is quantized
blockwise as it arrives (amax / 448 per 128x128 block, the scheme of Qwen's -FP8 checkpoints), so
no more than one bf16 weight is ever on the device.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from service.decode.fp8 import (
    BLOCK,
    FP8_DTYPE,
    Fp8Linear,
    Fp8Unsupported,
    decoder_linear_names,
    describe,
    gemm_for,
    quantize_blockwise,
)
from service.errors import ModelUnavailable

log = logging.getLogger(__name__)

SCALE_SUFFIX = ".weight_scale_inv"


@dataclass(frozen=True)
class Fp8Layout:
    """A checkpoint's ``quantization_config``, checked to be Qwen's FP8 layout."""

    not_converted: tuple[str, ...]  # modules_to_not_convert (informational: the tensors decide)


def checkpoint_quantization(config: dict) -> Fp8Layout | None:
    """None for an unquantized checkpoint; the FP8 layout; or ModelUnavailable for any other scheme."""
    quant = config.get("quantization_config")
    if not quant:
        return None
    method = str(quant.get("quant_method", "")).lower()
    if method != "fp8":
        raise ModelUnavailable(
            f"the checkpoint is quantized with {method or 'an unnamed method'!r}: the 8gb service runs bf16 "
            "checkpoints and Qwen's -FP8 ones (e.g. Qwen/Qwen3-VL-4B-Instruct-FP8)")
    problems = []
    if str(quant.get("fmt", "e4m3")).lower() != "e4m3":
        problems.append(f"fmt {quant.get('fmt')!r} (only e4m3)")
    if list(quant.get("weight_block_size") or []) != [BLOCK, BLOCK]:
        problems.append(f"weight_block_size {quant.get('weight_block_size')!r} (only [{BLOCK}, {BLOCK}])")
    if str(quant.get("activation_scheme", "dynamic")).lower() != "dynamic":
        problems.append(f"activation_scheme {quant.get('activation_scheme')!r} (only dynamic)")
    if problems:
        raise ModelUnavailable("this FP8 checkpoint is not in the layout of Qwen's -FP8 checkpoints: "
                               + "; ".join(problems))
    return Fp8Layout(tuple(quant.get("modules_to_not_convert") or ()))


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (sharded with an index, or one file)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelUnavailable(f"{path} has no model.safetensors or model.safetensors.index.json")


def load_fp8_model(path: Path, device: torch.device, dtype: torch.dtype, quantize: bool = False) -> nn.Module:
    """The checkpoint at ``path`` on ``device``: FP8 decoder linears, everything else in ``dtype``.
    ``quantize``: the checkpoint is bf16; quantize the decoder's linears while loading."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    try:
        gemm = gemm_for(device)
    except Fp8Unsupported as exc:
        raise ModelUnavailable(f"cannot run FP8 weights: {exc}") from None
    log.info("FP8 weights (%dx%d blocks%s) on %s", BLOCK, BLOCK, ", quantized while loading" if quantize else "",
             describe(gemm))
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):  # transformers would take its hub-kernel FP8 path
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    files = checkpoint_files(path)
    keys = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            keys.update(dict.fromkeys(f.keys(), file))
    fp8_names = {k[:-len(SCALE_SUFFIX)] for k in keys if k.endswith(SCALE_SUFFIX)}
    if quantize:
        if fp8_names:
            raise ModelUnavailable(f"{path} already holds FP8 weights but its config.json has no quantization_config")
        fp8_names = set(decoder_linear_names(model))
    for name in sorted(fp8_names):
        _make_fp8(model, name, gemm)
    unexpected = []
    for file in files:
        with safe_open(file, framework="pt", device=str(device)) as f:
            for key in f.keys():
                if not _assign(model, key, f.get_tensor(key), quantize):
                    unexpected.append(key)
    if unexpected:
        raise ModelUnavailable(f"{path} holds tensors a {type(model).__name__} has no place for: "
                               f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ModelUnavailable(f"{path} lacks {len(missing)} weight(s) of the model: {', '.join(missing[:5])}")
    for module in model.modules():  # rotary inverse frequencies, computed at construction on the CPU
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def _make_fp8(model: nn.Module, name: str, gemm) -> None:
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        raise ModelUnavailable(f"the checkpoint has FP8 scales for {name}, which the model does not have") from None
    if not isinstance(linear, nn.Linear) or linear.bias is not None:
        raise ModelUnavailable(f"the checkpoint has FP8 scales for {name}, which is not a bias-free linear layer")
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, Fp8Linear(linear.in_features, linear.out_features, gemm, device="meta"))


def _assign(model: nn.Module, key: str, tensor: torch.Tensor, quantize: bool) -> bool:
    """Put one checkpoint tensor in its place (checked; a bf16 weight of an FP8 module quantized
    when ``quantize``); False when the model has no such parameter."""
    owner, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return False
    placeholder = module._parameters.get(attr)
    if placeholder is None:
        return False
    if tensor.shape != placeholder.shape:  # Fp8Linear's placeholders have the FP8 layout's shapes
        raise ModelUnavailable(f"{key} has shape {tuple(tensor.shape)}; the model's config wants "
                               f"{tuple(placeholder.shape)}")
    if isinstance(module, Fp8Linear) and attr == "weight":
        if quantize:
            value, scale = quantize_blockwise(tensor)
            module.weight_scale_inv = nn.Parameter(scale, requires_grad=False)
        elif tensor.dtype != FP8_DTYPE:
            raise ModelUnavailable(f"{key} is {tensor.dtype}, not float8_e4m3fn, though it has block scales")
        else:
            value = tensor
    elif isinstance(module, Fp8Linear):
        value = tensor.to(torch.float32)
    elif tensor.dtype == FP8_DTYPE:
        raise ModelUnavailable(f"{key} is float8_e4m3fn but the checkpoint has no {owner}{SCALE_SUFFIX}")
    else:
        value = tensor.to(placeholder.dtype)
    module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    return True
