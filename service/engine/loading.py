"""Find the model on disk and load it once: weights (bf16 / fp16 / fp32, Qwen's FP8, nf4) and processor.

The model is a local directory or a hub id that is already in the local Hugging Face cache; this
module never downloads (the hub may be unreachable, and a download belongs to `make download`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from service.engine.fp8_checkpoint import checkpoint_quantization, load_fp8_model
from service.errors import ModelUnavailable
from service.settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: object  # a transformers ProcessorMixin
    path: Path
    device: torch.device
    dtype: torch.dtype  # of the activations, and of every weight but FP8 ones
    fp8: bool = False  # the decoder's linears are FP8 with block scales (service/decode/fp8.py)


def resolve_model_path(model: str) -> Path:
    """A local directory as is; a hub id through the local cache only (no network)."""
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelUnavailable(f"{local} is a directory but has no config.json: not a transformers checkpoint")
        return local.resolve()
    if local.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelUnavailable(
            f"model {model!r} is neither a checkpoint directory nor a hub id like 'Qwen/Qwen3-VL-2B-Instruct'"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ModelUnavailable(
            f"model {model!r} is not in the local Hugging Face cache ({HF_HUB_CACHE}). "
            f"Download it first: make download MODEL={model}"
        ) from None


def check_context(config, settings: ServiceSettings, where: str = "the model's config") -> None:
    """Refuse a --max-model-len above the model's maximum (its text config's max_position_embeddings,
    vLLM's derived max_model_len for Qwen3-VL), as vLLM refuses it: positions past it are ones the
    model was never trained on. ``where``: the config's file, for the message."""
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and settings.max_model_len > limit:
        raise ModelUnavailable(
            f"--max-model-len / VLKIT_MAX_MODEL_LEN: {settings.max_model_len} is greater than the model's maximum "
            f"context of {limit} tokens (max_position_embeddings in {where}; vLLM refuses it too): "
            f"give {limit} or less")


def check_max_model_len(path: Path, settings: ServiceSettings) -> None:
    """check_context from the checkpoint's config alone, before any weight loads."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"cannot read the model's config in {path}: {exc}") from exc
    check_context(config, settings, str(path / "config.json"))


def pick_device(settings: ServiceSettings) -> torch.device:
    if settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelUnavailable("--device cuda was asked for, but torch sees no CUDA GPU")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pick_dtype(settings: ServiceSettings, device: torch.device) -> torch.dtype:
    if settings.dtype != "auto":
        return getattr(torch, settings.dtype)
    if device.type == "cuda":  # Turing (sm_75) only emulates bf16: fp16 there
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.float32


def load_processor(path: Path):
    """AutoProcessor when torchvision is installed; otherwise the same processor class without video.

    Without torchvision, transformers can build Qwen3-VL's image processor (PIL backend) but not its
    video processor, and AutoProcessor fails on the latter. The service takes images only, so the
    processor is then assembled from the tokenizer and the PIL image processor, nothing else changed.
    """
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        processor = AutoProcessor.from_pretrained(path)
    else:
        processor = _load_image_only_processor(path)
    return processor


def _load_image_only_processor(path: Path):
    import transformers
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    model_type = AutoConfig.from_pretrained(path).model_type
    processor_name = _read_json(path / "processor_config.json").get("processor_class") \
        or _read_json(path / "preprocessor_config.json").get("processor_class") \
        or PROCESSOR_MAPPING_NAMES.get(model_type)
    image_names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type) or {}
    image_name = image_names.get("pil") if isinstance(image_names, dict) else None
    if not processor_name or not image_name:
        raise ModelUnavailable(
            f"cannot build a processor for model type {model_type!r} without torchvision; install torchvision"
        )
    processor_cls = getattr(transformers, processor_name)
    image_processor = getattr(transformers, image_name).from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    chat_template = tokenizer.chat_template
    template_file = path / "chat_template.jinja"
    if template_file.is_file():
        chat_template = template_file.read_text(encoding="utf-8")

    class ImageOnlyProcessor(processor_cls):  # type: ignore[misc, valid-type]
        """`processor_cls` minus its video processor (which needs torchvision)."""

        @classmethod
        def get_attributes(cls):
            return [a for a in super().get_attributes() if a != "video_processor"]

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f"{processor_cls.__name__}ImageOnly"
    kwargs = {"image_processor": image_processor, "tokenizer": tokenizer, "chat_template": chat_template}
    return ImageOnlyProcessor(**kwargs)


def image_kwargs(processor, settings: ServiceSettings) -> dict:
    """Per-call image processor kwargs that bound the resized image to [min_pixels, max_pixels].

    Qwen-VL image processors take `min_pixels`/`max_pixels` and round to the patch*merge grid
    themselves; other processors get no extra kwargs.
    """
    valid = getattr(getattr(processor, "image_processor", None), "valid_kwargs", None)
    names = getattr(valid, "__annotations__", {})
    if "min_pixels" in names and "max_pixels" in names:
        return {"min_pixels": settings.min_pixels, "max_pixels": settings.max_pixels}
    return {}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def load_model(path: Path, device: torch.device, dtype: torch.dtype,
               quantize: str = "none") -> tuple[torch.nn.Module, bool]:
    """The model on ``device`` and whether its decoder is FP8: Qwen's -FP8 checkpoints, and bf16
    ones with ``quantize="fp8"``, through fp8_checkpoint (transformers' FP8 path needs the hub);
    the rest through transformers (``quantize="nf4"``: bitsandbytes 4-bit)."""
    from transformers import AutoModelForImageTextToText

    stored_fp8 = checkpoint_quantization(_read_json(path / "config.json")) is not None
    if stored_fp8 and quantize == "nf4":
        raise ModelUnavailable(f"{path} is an FP8 checkpoint; --quantization nf4 quantizes bf16 checkpoints")
    if stored_fp8 or quantize == "fp8":
        return load_fp8_model(path, device, dtype, quantize=not stored_fp8), True
    kwargs: dict = {"dtype": dtype}
    if quantize == "nf4":
        kwargs.update(_nf4_options(device, dtype))
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"cannot load the model from {path}: {exc}") from exc
    if quantize != "nf4":
        model.to(device)
    return model.eval(), False


def _nf4_options(device: torch.device, dtype: torch.dtype) -> dict:
    if device.type != "cuda":
        raise ModelUnavailable("--quantization nf4 needs a CUDA GPU (bitsandbytes 4-bit runs on CUDA only)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelUnavailable("--quantization nf4 needs bitsandbytes: pip install -e '.[service,nf4]'") from None
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
        # The vision tower is small and sensitive to quantization; keep it (and the head) in `dtype`.
        llm_int8_skip_modules=["visual", "vision_tower", "lm_head"])
    return {"quantization_config": config, "device_map": {"": device.index or 0}}


def load(settings: ServiceSettings) -> LoadedModel:
    """Resolve, then load processor and weights once."""
    path = resolve_model_path(settings.model)
    check_max_model_len(path, settings)
    device = pick_device(settings)
    dtype = pick_dtype(settings, device)
    log.info("loading %s on %s as %s", path, device, dtype)
    processor = load_processor(path)
    model, fp8 = load_model(path, device, dtype, settings.quantization)
    return LoadedModel(model=model, processor=processor, path=path, device=device, dtype=dtype, fp8=fp8)
