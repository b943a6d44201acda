"""The service's settings: the one source of truth for every knob of the 8gb profile.

Read from environment variables prefixed ``VLKIT_`` (e.g. ``VLKIT_MAX_PIXELS``), from an env file
given in ``VLKIT_ENV_FILE``, and from CLI flags (``python -m service --max-pixels ...``), in that
order of precedence: flags over environment over defaults. The host planner writes the same names
into the compose env file, so this module must stay importable without torch.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Literal, Optional

from dotenv import dotenv_values
from dotenv.parser import parse_stream
from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, DotEnvSettingsSource, SettingsConfigDict, SettingsError
from pydantic_settings.sources.utils import parse_env_vars

from service.sizing import DEFAULT_BATCHED_TOKENS

ENV_PREFIX = "VLKIT_"
ENV_FILE_VARIABLE = ENV_PREFIX + "ENV_FILE"


class EnvFile(DotEnvSettingsSource):
    """The file VLKIT_ENV_FILE names, read strictly (a SettingsError naming the file, and the line):
    pydantic-settings skips a missing file and dotenv drops a line it cannot parse with a log warning
    only, so the settings in them silently kept their defaults. Read once (the file may be a pipe)."""

    def _load_env_vars(self):
        name = os.environ.get(ENV_FILE_VARIABLE)
        if not name:
            return {}
        try:
            text = Path(name).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsError(f"{ENV_FILE_VARIABLE} {name}: cannot read it: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise SettingsError(f"{ENV_FILE_VARIABLE} {name}: not UTF-8 text") from None
        for binding in parse_stream(io.StringIO(text)):
            if binding.error:  # its text starts with the blank lines before it
                statement = binding.original.string
                line = binding.original.line + statement[:len(statement) - len(statement.lstrip())].count("\n")
                raise SettingsError(f"{ENV_FILE_VARIABLE} {name}, line {line}: cannot be parsed (want NAME=value)")
        values = dotenv_values(stream=io.StringIO(text))
        return parse_env_vars(values, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        # The same order (flags over environment over the env file), the env file strict (EnvFile).
        return init_settings, env_settings, EnvFile(settings_cls), file_secret_settings

    model: str = Field("Qwen/Qwen3-VL-2B-Instruct", description="local path or hub id (resolved from the local Hugging Face cache)")
    served_model_name: Optional[str] = Field(None, description="name clients pass as `model`; defaults to --model")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="auto: bf16 on GPU (fp16 on Turing, which has no bf16), float32 on CPU")
    quantization: Literal["none", "fp8", "nf4"] = Field("none", description="fp8: quantize a bf16 checkpoint's decoder linears to FP8 while loading (128x128 blocks, as Qwen's -FP8 checkpoints, which load as FP8 anyway); nf4: 4-bit bitsandbytes weights (CUDA only), for what FP8 does not fit")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: the first CUDA GPU when torch sees one, else the CPU")
    host: str = Field("127.0.0.1", description="bind address; 127.0.0.1 unless you mean to expose it (then set --api-key: without one, start-up warns)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    published_host: Optional[str] = Field(None, description="in a container: the host address its port is published on (vlkit's compose sets 127.0.0.1); the start-up's no-API-key warning judges that address instead of --host")
    max_model_len: int = Field(2048, ge=64, description="max context: prompt (text + image tokens) + new tokens, at most the model's own maximum (max_position_embeddings; above it the start is refused, as by vLLM)")
    max_pixels: int = Field(1003520, ge=3136, description="images larger than this are resized down (default 1280x784; ~1000 image tokens for Qwen3-VL)")
    min_pixels: int = Field(65536, ge=1024, description="smaller images are scaled up to this (Qwen3-VL's processor default)")
    max_images_per_request: int = Field(2, ge=0, description="more images in one request: 400 (two of max_pixels fill the default context)")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="per image, encoded")
    max_image_source_pixels: int = Field(50_000_000, ge=1, description="decompression-bomb guard on the decoded size, before resizing")
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="whole request body; larger: 413")
    max_connections: int = Field(256, ge=1, description="open connections (and running requests) at most; past it a request gets 503 at once (uvicorn's limit_concurrency)")
    head_timeout_seconds: float = Field(10.0, gt=0, description="a request's line and headers must arrive within this (else 408): slow clients cannot hold connections")
    body_timeout_seconds: float = Field(60.0, gt=0, description="a request's body must arrive within this (else 408)")
    send_timeout_seconds: float = Field(60.0, gt=0, description="a client that takes none of its waiting response for this long (it stopped reading) is dropped and its request cancelled, as nginx's send_timeout; slow readers stay")
    max_header_bytes: int = Field(65536, ge=1024, description="request line and headers together, at most (else 431)")
    max_headers: int = Field(100, ge=8, description="headers in one request, at most (else 431)")
    max_tokens_default: Optional[int] = Field(None, ge=1, description="new tokens at most when a request sets no max_tokens; unset: the rest of the context, as vLLM (each such request reserves its whole context in KV blocks)")
    max_batch_size: int = Field(8, ge=1, description="requests decoded together (they join and leave between steps)")
    max_num_batched_tokens: int = Field(DEFAULT_BATCHED_TOKENS, ge=64, description="prompt tokens one prefill pass computes at most, pieces of several prompts packed (vLLM's --max-num-batched-tokens); larger passes serve bursts faster and make running requests wait longer between tokens, and the start-up measures what they cost in memory")
    max_queue: int = Field(64, ge=1, description="requests waiting beyond the running batch; more get 429")
    memory_budget_gib: float = Field(6.0, gt=0, description="the whole process on the GPU (as NVML sees it) stays under this")
    cuda_graphs: bool = Field(True, description="capture the decode step in CUDA graphs at start-up (Qwen3-VL on CUDA)")
    compile: bool = Field(True, description="torch.compile the decode step's elementwise kernels and the vision tower's blocks at start-up (Qwen3-VL on CUDA)")
    compile_cache_dir: Optional[Path] = Field(None, description="where compiled kernels are cached across restarts (TorchInductor and Triton caches; put it on a volume); default ~/.cache/vlkit/compile")
    api_key: Optional[str] = Field(None, description="when set, requests need `Authorization: Bearer <key>`")
    allow_remote_urls: bool = Field(False, description="fetch http(s) image URLs (off: refused with 400)")
    allowed_media_dir: Optional[Path] = Field(None, description="file:// images only from under this directory (which must exist); unset: none")
    allowed_origins: str = Field("*", description="CORS: the origins (comma-separated) whose web pages may call the API from a browser; `*`: any, vLLM's default; empty: none")
    warmup: bool = Field(True, description="run one request at start-up before /health/ready says ready")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="server log level")

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, v: str) -> str:
        # Path("") is the current folder: an empty --model would be looked for there.
        if not v.strip():
            raise ValueError("is empty: give a checkpoint directory or a hub id like 'Qwen/Qwen3-VL-2B-Instruct'")
        return v

    @field_validator("allowed_media_dir", mode="before")
    @classmethod
    def _media_dir_is_a_directory(cls, v: object) -> object:
        # Checked at start-up: otherwise every file:// image fails later, each request on its own.
        # Before Path(): Path("") is the current folder.
        if v is None:
            return v
        if not str(v).strip():
            raise ValueError("is empty: give a directory, or leave it unset to refuse local image files")
        path = Path(str(v)).expanduser()
        if not path.is_dir():
            raise ValueError("is a file, not a directory" if path.exists() else "no such directory")
        return v

    @field_validator("compile_cache_dir", mode="before")
    @classmethod
    def _compile_cache_dir_not_empty(cls, v: object) -> object:
        # Before Path(): Path("") is the current folder, which would fill with compiled kernels.
        if v is not None and not str(v).strip():
            raise ValueError("is empty: give a directory, or leave it unset for ~/.cache/vlkit/compile")
        return v

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, v: object) -> object:
        return None if v in ("", None) else v

    @field_validator("min_pixels")
    @classmethod
    def _min_pixels_not_above_max(cls, v: int, info: ValidationInfo) -> int:
        # Checked here, not at the first image: the processor would refuse every image, warm-up's too.
        high = info.data.get("max_pixels")  # validated first: declared first
        if high is not None and v > high:
            raise ValueError(f"{v} is above --max-pixels {high}: give min_pixels at most max_pixels")
        return v

    @property
    def cors_origins(self) -> list[str]:
        return [origin.strip() for origin in self.allowed_origins.split(",") if origin.strip()]

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model
