"""Model shapes the planner needs: layers, KV heads, weights, the vision tower.

Built in: the published Qwen3-VL 2B/4B/8B Instruct and Thinking checkpoints and their -FP8 twins
(the architecture figures come from ``service.model_shapes``, the one copy of those configs in the
repo). Any other Qwen3-VL checkpoint is read from a local directory (config.json, weight bytes from
the safetensors index or headers) or from the local Hugging Face cache, offline.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from service import sizing
from service.model_shapes import SHAPES

WeightFormat = Literal["bf16", "fp8", "nf4"]   # how the weights sit on the GPU

# Qwen3-VL's image processor default (preprocessor_config.json "size.longest_edge"): 4096x4096.
QWEN3_VL_PROCESSOR_MAX_PIXELS = 16_777_216
SUPPORTED_MODEL_TYPES = ("qwen3_vl",)
# safetensors dtype name -> bytes per element
_ST_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
                   "I16": 2, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


class UnknownModelError(ValueError):
    """The model is neither built in, nor a local directory, nor in the local Hugging Face cache."""


class VisionShape(BaseModel):
    depth: int
    hidden: int
    intermediate: int
    heads: int
    patch: int
    temporal_patch: int
    merge: int
    out_hidden: int
    deepstack: int           # number of deepstack mergers (each one more output slice)
    in_channels: int = 3
    num_position_embeddings: int = 2304

    @property
    def linear_params(self) -> int:
        """The weights of the blocks' and mergers' linear layers (what an FP8 tower quantizes)."""
        d, merged = self.hidden, self.hidden * self.merge**2
        return self.depth * (4 * d * d + 2 * d * self.intermediate) + (1 + self.deepstack) * merged * (
            merged + self.out_hidden)

    @property
    def params(self) -> int:
        d, i = self.hidden, self.intermediate
        block = (d * 3 * d + 3 * d) + (d * d + d) + (d * i + i) + (i * d + d) + 4 * d
        merged = d * self.merge**2
        merger = 2 * merged + (merged * merged + merged) + (merged * self.out_hidden + self.out_hidden)
        patch_embed = self.in_channels * self.temporal_patch * self.patch**2 * d + d
        return self.depth * block + (1 + self.deepstack) * merger + patch_embed + self.num_position_embeddings * d


class TextShape(BaseModel):
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    max_position: int

    @property
    def linear_params(self) -> int:
        """Parameters of the decoder layers' linear projections (what FP8 / nf4 quantize)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = self.hidden * q + 2 * self.hidden * kv + q * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def norm_params(self) -> int:
        return self.layers * (2 * self.hidden + 2 * self.head_dim) + self.hidden


class ModelSpec(BaseModel):
    id: str
    source: str                     # "built-in", or the directory the config was read from
    text: TextShape
    vision: VisionShape
    quantization: str = "none"      # "none" | "fp8" (checkpoint format)
    # FP8 only: vLLM quantizes the vision tower's linears too unless the checkpoint's
    # modules_to_not_convert names each of them (it matches full names, quantization/utils/quant_utils.py
    # is_layer_skipped); Qwen's -FP8 checkpoints name them, a list with just "visual" does not.
    vision_quantized: bool = False
    weight_bytes: int               # on the GPU as vLLM loads it (bf16, or fp8 linears for -FP8)
    processor_max_pixels: int = QWEN3_VL_PROCESSOR_MAX_PIXELS

    @property
    def bf16_weight_bytes(self) -> int:
        return 2 * (self.text.linear_params + self.text.embedding_params + self.text.norm_params
                    + self.vision.params)

    def nf4_weight_bytes(self) -> int:
        """bitsandbytes nf4 with double quantization (~4.13 bits a weight) on the decoder linears;
        embeddings, lm_head and the vision tower stay bf16 (the service skips them)."""
        return int(self.text.linear_params * 4.127 / 8) + 2 * (
            self.text.embedding_params + self.text.norm_params + self.vision.params)

    def weight_bytes_as(self, weights: WeightFormat) -> int:
        """The weights' bytes on the GPU in this format. fp8: the checkpoint's own FP8 layout (what
        ``weight_bytes`` holds for a -FP8 checkpoint)."""
        if weights == "nf4":
            return self.nf4_weight_bytes()
        if weights == "fp8":
            return self.weight_bytes if self.fp8_checkpoint else _fp8_weight_bytes(self.text, self.vision)
        return self.bf16_weight_bytes

    def kv_bytes_per_token(self, dtype_bytes: int = 2, tp: int = 1) -> int:
        t = self.text
        return sizing.kv_bytes_per_token(layers=t.layers, kv_heads=t.kv_heads, head_dim=t.head_dim,
                                         dtype_bytes=dtype_bytes, tp=tp)

    @property
    def fp8_checkpoint(self) -> bool:
        return self.quantization == "fp8"


def _shape_from_config(cfg: dict) -> tuple[TextShape, VisionShape]:
    text, vis = cfg.get("text_config") or {}, cfg.get("vision_config") or {}
    if not isinstance(text, dict) or not isinstance(vis, dict):
        raise UnknownModelError("config.json's text_config and vision_config are not JSON objects: not a Qwen3-VL config")
    try:
        heads = text["num_attention_heads"]
        t = TextShape(
            hidden=text["hidden_size"], intermediate=text["intermediate_size"],
            layers=text["num_hidden_layers"], heads=heads,
            kv_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or text["hidden_size"] // heads,
            vocab=text.get("vocab_size", 151936),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            max_position=text.get("max_position_embeddings", 262144),
        )
        v = VisionShape(
            depth=vis["depth"], hidden=vis["hidden_size"], intermediate=vis["intermediate_size"],
            heads=vis["num_heads"], patch=vis.get("patch_size", 16),
            temporal_patch=vis.get("temporal_patch_size", 2), merge=vis.get("spatial_merge_size", 2),
            out_hidden=vis.get("out_hidden_size", text["hidden_size"]),
            deepstack=len(vis.get("deepstack_visual_indexes") or []),
            in_channels=vis.get("in_channels", 3),
            num_position_embeddings=vis.get("num_position_embeddings", 2304),
        )
    except KeyError as e:
        raise UnknownModelError(f"config.json lacks {e.args[0]!r}: not a Qwen3-VL config") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:  # a value of the wrong type, zero heads
        first = str(e).splitlines()[0]
        raise UnknownModelError(f"config.json has a value a Qwen3-VL config cannot have ({first})") from None
    return t, v


def _fp8_weight_bytes(t: TextShape, v: VisionShape, vision_quantized: bool = False) -> int:
    """Qwen's -FP8 checkpoints: decoder linears in FP8 with one fp32 scale per 128x128 block;
    embeddings, lm_head, norms and the vision tower stay bf16 (its linears in FP8 too where
    ``vision_quantized``)."""
    vision = v.linear_params + v.linear_params // (128 * 128) * 4 + 2 * (v.params - v.linear_params) \
        if vision_quantized else 2 * v.params
    return t.linear_params + t.linear_params // (128 * 128) * 4 + 2 * (t.embedding_params + t.norm_params) + vision


def _builtin_specs() -> dict[str, ModelSpec]:
    specs: dict[str, ModelSpec] = {}
    for size in ("2B", "4B", "8B"):
        t, v = _shape_from_config(SHAPES[size.lower()])
        for variant in ("Instruct", "Thinking"):
            for fp8 in (False, True):
                mid = f"Qwen/Qwen3-VL-{size}-{variant}" + ("-FP8" if fp8 else "")
                spec = ModelSpec(id=mid, source="built-in", text=t, vision=v,
                                 quantization="fp8" if fp8 else "none", weight_bytes=0)
                spec.weight_bytes = _fp8_weight_bytes(t, v) if fp8 else spec.bf16_weight_bytes
                specs[mid.lower()] = spec
    return specs


BUILTIN: dict[str, ModelSpec] = _builtin_specs()
BUILTIN_IDS: tuple[str, ...] = tuple(s.id for s in BUILTIN.values())


class LfsPointer(Exception):
    """A .safetensors file that is a Git LFS pointer (a clone without git-lfs), not the weights."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self.path = path


def _safetensors_bytes(directory: Path) -> int | None:
    """Bytes of all tensors: the index's total_size, else the sum over each file's header."""
    files = sorted(directory.glob("*.safetensors"))
    for f in files:  # a clone without git-lfs: its index is real, its shards pointers
        with f.open("rb") as fh:
            if fh.read(7) == b"version":
                raise LfsPointer(f)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        metadata = json.loads(index.read_text(encoding="utf-8"))
        metadata = metadata.get("metadata") if isinstance(metadata, dict) else None
        total = metadata.get("total_size") if isinstance(metadata, dict) else None
        if total:
            return int(total)
    if not files:
        return None
    total = 0
    for f in files:
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > f.stat().st_size - 8:
                raise ValueError(f"{f.name}: a header longer than the file")
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start, end = meta["data_offsets"]
            total += end - start
    return total


def fp8_modules_not_converted(v: VisionShape) -> list[str]:
    """The modules_to_not_convert of a Qwen -FP8 checkpoint: lm_head and every linear of the vision
    tower by its full name (that is how vLLM leaves them in bf16)."""
    blocks = [f"model.visual.blocks.{i}.{name}" for i in range(v.depth)
              for name in ("attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2")]
    mergers = ["model.visual.merger"] + [f"model.visual.deepstack_merger_list.{j}" for j in range(v.deepstack)]
    return ["lm_head", *blocks, *(f"{m}.linear_fc{k}" for m in mergers for k in (1, 2))]


def _names_vision_linears(qcfg: dict) -> bool:
    """Whether an FP8 quantization_config keeps the vision tower in bf16 as vLLM reads it: its
    ignore list must name the blocks' linears (vLLM compares full names; "visual" alone matches none)."""
    ignored = qcfg.get("ignored_layers") or qcfg.get("modules_to_not_convert") or []
    return any("visual.blocks." in str(name) for name in ignored)


def spec_from_dir(directory: Path, model_id: str | None = None) -> ModelSpec:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise UnknownModelError(f"{directory} has no config.json")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UnknownModelError(f"{cfg_path} is not UTF-8 (transformers reads it as UTF-8): save it as UTF-8") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UnknownModelError(f"{cfg_path} is not readable JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise UnknownModelError(f"{cfg_path} is not a JSON object: not a model's config")
    if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise UnknownModelError(
            f"{directory}: model_type {cfg.get('model_type')!r} is not supported; vlkit plans "
            f"Qwen3-VL checkpoints (model_type {', '.join(SUPPORTED_MODEL_TYPES)})")
    t, v = _shape_from_config(cfg)
    qcfg = cfg.get("quantization_config") or {}
    fp8 = str(qcfg.get("quant_method", "")).lower() == "fp8"
    spec = ModelSpec(id=model_id or str(directory), source=str(directory), text=t, vision=v,
                     quantization="fp8" if fp8 else "none", weight_bytes=0,
                     vision_quantized=fp8 and not _names_vision_linears(qcfg))
    # Real bytes on disk when the weights are there (they load 1:1 for bf16 and fp8 checkpoints).
    try:
        on_disk = _safetensors_bytes(directory)
    except LfsPointer as e:
        raise UnknownModelError(
            f"{e.path} is a Git LFS pointer, not the weights (the folder was cloned without git-lfs): run "
            f"`git lfs pull` in {directory}, or download the model again") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):  # a truncated or odd file
        on_disk = None
    spec.weight_bytes = on_disk or (_fp8_weight_bytes(t, v, spec.vision_quantized) if fp8 else spec.bf16_weight_bytes)
    pre = directory / "preprocessor_config.json"
    if pre.is_file():
        try:
            size = json.loads(pre.read_text(encoding="utf-8")).get("size") or {}
            if size.get("longest_edge"):
                spec.processor_max_pixels = int(size["longest_edge"])
        except (OSError, ValueError, AttributeError, TypeError):  # not the layout we know: keep the default
            pass
    return spec


def _from_hf_cache(repo_id: str) -> Path | None:
    """The snapshot directory of a cached repo, without touching the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a host dependency
        return None
    from scripts.hf_cache import hub_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=hub_cache())  # the cache `up` mounts
    except Exception:  # invalid repo id etc.
        return None
    return Path(found).parent if isinstance(found, str) else None


def resolve_model(id_or_path: str) -> ModelSpec:
    """A model's spec from a local directory, the built-in table or the local Hugging Face cache."""
    path = Path(id_or_path).expanduser()
    if path.is_dir():
        return spec_from_dir(path)
    builtin = BUILTIN.get(id_or_path.strip().lower())
    if builtin is not None:
        return builtin.model_copy(deep=True)
    if id_or_path.count("/") == 1 and not path.exists():
        cached = _from_hf_cache(id_or_path)
        if cached is not None:
            return spec_from_dir(cached, model_id=id_or_path)
    raise UnknownModelError(_unknown(id_or_path))


def _unknown(id_or_path: str) -> str:
    """Why `id_or_path` names no model, with the step that helps: the built-in id it is a typo of,
    the folder that is not there, or downloading a hub model vlkit has no table for."""
    import difflib

    from scripts.hf_cache import hub_cache
    from scripts.usage import command, setting

    text = id_or_path.strip()
    from wsl.host import is_windows_path, windows_to_wsl_path

    if is_windows_path(text):  # in WSL, Windows' drives are under /mnt

        return (f"unknown model '{text}': a Windows path; in WSL that folder is "
                f"{setting('model', windows_to_wsl_path(text))}")
    typed = text.lower() if "/" in text else f"qwen/{text.lower()}"
    # A typo keeps the numbers: Qwen3-VL-32B is another model, not a misspelt 2B.
    same_numbers = [b for b in BUILTIN if re.findall(r"\d+", b) == re.findall(r"\d+", typed)]
    close = difflib.get_close_matches(typed, same_numbers, n=1, cutoff=0.85)
    if close:
        return f"unknown model {id_or_path!r}: did you mean {setting('model', BUILTIN[close[0]].id)}?"
    if Path(text).expanduser().is_file():
        return (f"unknown model {id_or_path!r}: that is a file; give the folder that holds the model's "
                f"config.json ({Path(text).expanduser().parent})")
    if text.count("/") != 1 or text.startswith((".", "~", "/")):
        return (f"unknown model {id_or_path!r}: no such folder ({Path(text).expanduser().absolute()}), and not "
                f"a hub id (org/name); give the folder save_pretrained wrote, or a hub id such as {BUILTIN_IDS[0]}")
    return (f"unknown model {id_or_path!r}: vlkit knows {', '.join(BUILTIN_IDS)}; another Qwen3-VL checkpoint "
            f"is read from its config.json, so download it first (`{command('download', model=text)}`: "
            f"not in the cache {hub_cache()}) or give its folder")


def variants_to_try(spec: ModelSpec) -> list[str]:
    """Smaller or FP8 built-in alternatives, best first (for a refusal's next step)."""
    name = spec.id.split("/")[-1]
    sizes = ["8B", "4B", "2B"]
    variant = "Thinking" if "Thinking" in name else "Instruct"
    size = next((s for s in sizes if f"-{s}-" in name + "-"), None)
    if size is None:
        return [f"Qwen/Qwen3-VL-{s}-{variant}-FP8" for s in sizes[1:]]
    out = []
    if not spec.fp8_checkpoint:
        out.append(f"Qwen/Qwen3-VL-{size}-{variant}-FP8")
    for s in sizes[sizes.index(size) + 1:]:
        out += [f"Qwen/Qwen3-VL-{s}-{variant}-FP8", f"Qwen/Qwen3-VL-{s}-{variant}"]
    return out
