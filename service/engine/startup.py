"""Start-up: torch's environment, the memory plan, the decode step's compile and CUDA graphs.

On CUDA the KV cache is sized from measurements (service/sizing.py has the rules the planner
mirrors): after the weights load, a prefill of the largest request the settings admit is run
(twice: the first loads kernels and workspaces, which stay resident) and its activation peak
measured; what NVML then sees the process hold is resident; the KV cache gets what the budget
leaves, in blocks. The prefill runs in passes of max_num_batched_tokens and the vision tower in
batches of that request's images (prefill_for); its last pass is filled to a full one with text
prompts (filler_lengths), so the measurement bounds the activations of every pass. On the CPU
there is no budget (system RAM is not what it protects): the cache holds max_batch_size sequences
of max_model_len.
"""
from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from service.decode import DecodeRunner, PagedKVCache, Qwen3VLDecoder, Qwen3VLPrefill
from service.decode.kernel_choice import release_workspaces
from service.decode.qwen3_step import fuse_linears, text_model_of
from service.engine.batch import Batch
from service.engine.memory import ProcessMemory
from service.engine.requests import Prompt
from service.engine.sampling import MAX_LOGPROBS
from service.errors import ModelUnavailable
from service.host_memory import available_host_memory
from service.settings import ServiceSettings
from service.sizing import (
    BLOCK_SIZE, DECODE_BATCH_SIZES, GIB, KVPlan, blocks_for, plan_kv_blocks, vision_batch_tokens,
)

log = logging.getLogger(__name__)

DEFAULT_COMPILE_CACHE = Path.home() / ".cache" / "vlkit" / "compile"


def limit_cpu_threads(device: torch.device) -> None:
    """On a GPU, torch's CPU work is the requests' image processing, each request in a thread of its
    own: with an intra-op pool of every core for each of them, they oversubscribed the cores the
    scheduler thread launches kernels from. One thread each, as vLLM runs its processor;
    OMP_NUM_THREADS (torch reads it itself) overrides. On the CPU the model's own work needs the pool."""
    if device.type != "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def configure_torch(settings: ServiceSettings) -> Path:
    """Environment torch reads lazily; call before the process first touches CUDA.

    - The allocator grows expandable segments instead of fixed blocks, so prefills of changing
      sizes do not fragment the memory the budget counts (the user's own setting wins).
    - TorchInductor and Triton keep compiled kernels in one directory that survives restarts
      (a volume in the container), so start-up after the first only loads them.
    - Attention (prefill, vision tower) never goes to cuDNN's SDPA: it builds a plan for every new
      shape, and prompt lengths and image sizes change with every request; flash and memory-
      efficient attention are ready-made kernels.
    """
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    torch.backends.cuda.enable_cudnn_sdp(False)
    root = settings.compile_cache_dir or DEFAULT_COMPILE_CACHE  # VLKIT_COMPILE_CACHE_DIR is read by the settings
    if settings.compile_cache_dir is not None or "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    if settings.compile_cache_dir is not None or "TRITON_CACHE_DIR" not in os.environ:
        os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
    return root


def build_batch(model: Any, largest: Prompt, settings: ServiceSettings, max_model_len: int, dtype: torch.dtype,
                device: torch.device, memory: ProcessMemory | None,
                seconds: dict[str, float]) -> tuple[Batch, KVPlan | None]:
    """The engine's batch: the KV cache sized from the budget, the decode step compiled and captured.
    ``largest``: the largest admissible request (its prefill is measured); ``seconds`` gets the phases."""
    on_cuda = device.type == "cuda"
    started = time.perf_counter()
    plan = None
    check_batch_fits(model, settings, max_model_len, dtype, device, memory)
    if on_cuda:
        for layer in text_model_of(model).layers:  # one matmul each, in place, before memory is measured
            fuse_linears([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
            fuse_linears([layer.mlp.gate_proj, layer.mlp.up_proj])
        plan = plan_memory(model, largest, settings, max_model_len, dtype, device, memory)
    cache = PagedKVCache(model.config, settings.max_batch_size, max_model_len, plan.blocks if plan else None,
                         dtype=dtype, device=device)
    decoder = Qwen3VLDecoder(model, cache, fuse_projections=on_cuda,
                             compile_backend="inductor" if on_cuda and settings.compile else None)
    # The Triton attention ends blocks past each row's length at once: coarse context buckets (fewer
    # graphs to capture) cost little there.
    runner = DecodeRunner(decoder, batch_sizes=DECODE_BATCH_SIZES, context_step=512 if decoder.attention == "triton" else 256)
    seconds["memory plan"] = time.perf_counter() - started
    ceiling = None
    if on_cuda:
        started = time.perf_counter()
        decoder.measure_projections(runner.batch_sizes)  # before capture: the graphs keep what it chose
        # The timing's buffers (Triton's autotuner flushes the L2 with a 256 MB tensor; cuBLAS's
        # workspace of each stream it ran on) go back to the driver: the budget was shared out before them.
        release_workspaces()
        gc.collect()
        torch.cuda.empty_cache()
        if settings.cuda_graphs:
            runner.capture()  # its warm-up compiles each batch size first
        else:
            runner.warm_up()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        seconds["compile + graphs"] = time.perf_counter() - started
        ceiling = torch.cuda.memory_reserved(device) + plan.prefill_peak
        used = memory.used()
        log.info("%s; process now %.2f GiB (NVML), %d decode graphs", plan.describe(), used / GIB, len(runner.graphs))
        if used + plan.prefill_peak > plan.budget:  # what a prefill adds would cross the budget
            log.warning("the process holds %.2f GiB after start-up, more than the plan's %.2f GiB without the "
                        "prefill reserve: the budget may be exceeded by %.2f GiB", used / GIB,
                        (plan.budget - plan.prefill_peak) / GIB, (used + plan.prefill_peak - plan.budget) / GIB)
    # A pass holds at most the largest request's images, whose features the memory plan measured.
    return Batch(runner, prefill_for(model, decoder, largest, settings),
                 max_images_per_pass=max(1, settings.max_images_per_request), reserved_ceiling=ceiling), plan


def check_batch_fits(model: Any, settings: ServiceSettings, max_model_len: int, dtype: torch.dtype,
                     device: torch.device, memory: ProcessMemory | None) -> None:
    """Refuse a --max-batch-size whose buffers cannot fit, before they are allocated (torch's own
    error names no setting). Each row has its logits, inputs and block-table row; on the CPU, where
    no budget plans the KV cache, also a whole context of KV cache. On a GPU they must fit in what the
    budget leaves beside what the process holds now (the KV cache is planned from what remains); on
    the CPU in the memory the machine has available."""
    rows = settings.max_batch_size
    vocab = model.get_output_embeddings().weight.shape[0]
    parts = {"the rows' logits, inputs and block table":
             rows * (DecodeRunner.slot_bytes(vocab) + PagedKVCache.slot_bytes(max_model_len))}
    if device.type == "cuda":
        available = int(settings.memory_budget_gib * GIB) - memory.used()
        room = f"--memory-budget-gib {settings.memory_budget_gib} leaves beside the weights and the CUDA context"
        lower = "--max-batch-size"
    else:
        block_bytes = PagedKVCache.bytes_per_token(model.config, dtype) * BLOCK_SIZE
        kv = f"the KV cache of {rows} sequences of --max-model-len {max_model_len}"
        parts[kv] = (rows * blocks_for(max_model_len) + 1) * block_bytes  # + the scratch block
        available, room = available_host_memory(), "this machine has available"
        lower = "--max-batch-size or --max-model-len"
    need = sum(parts.values())
    if available is not None and need > available:
        detail = ", ".join(f"{name}: {size / GIB:.2f} GiB" for name, size in parts.items())
        raise ModelUnavailable(f"--max-batch-size {rows} needs {need / GIB:.2f} GiB ({detail}), more than the "
                               f"{max(available, 0) / GIB:.2f} GiB {room}: lower {lower}")


def prefill_for(model: Any, decoder: Qwen3VLDecoder, largest: Prompt, settings: ServiceSettings) -> Qwen3VLPrefill:
    """The prefill the engine runs, and the memory plan measures on ``largest``: passes of
    max_num_batched_tokens, the vision tower in batches of whole images of the largest request
    (sizing.vision_batch_tokens; one image at a time where that request holds none), its blocks'
    work around attention compiled where the decode step is."""
    vision = 1
    if largest.images:
        per_image = int(largest.image_grid_thw.prod(-1).max()) // model.model.visual.spatial_merge_size ** 2
        vision = vision_batch_tokens(settings.max_num_batched_tokens, per_image, largest.images)
    compile_backend = "inductor" if decoder.cache.device.type == "cuda" and settings.compile else None
    return Qwen3VLPrefill(model, decoder, settings.max_num_batched_tokens, vision, compile_backend)


def filler_lengths(prompt_length: int, chunk: int, max_model_len: int, max_prompts: int) -> list[int]:
    """Lengths of the text prompts that fill the largest prompt's last prefill pass to ``chunk``
    tokens, each shorter than the context, at most ``max_prompts`` - 1 of them (the batch's rows):
    the engine packs short prompts after a long one's last piece, so its largest pass is a full one
    whose first piece attends to the whole largest prefix."""
    longest = max(1, max_model_len - 1)
    room = min(chunk - ((prompt_length - 1) % chunk + 1), (max_prompts - 1) * longest)
    return [min(longest, room - start) for start in range(0, room, longest)]


def run_largest_pass(prefiller: Qwen3VLPrefill, prompt: Prompt, slots: list[int], fillers: list[int]) -> None:
    """The prompt's prefill into ``slots[0]``, its last pass packed with the filler prompts (one
    token repeated) in the other slots. It gathers the most prompt logprobs a request may ask for,
    so the measured peak holds their lm_head over PROMPT_LOGPROBS_ROWS positions too."""
    jobs = [prefiller.job(slots[0], prompt.input_ids, prompt.mrope_positions, prompt.rope_delta,
                          prompt.pixel_values, prompt.image_grid_thw, prompt_logprobs=MAX_LOGPROBS)]
    jobs += [prefiller.job(slot, prompt.input_ids[-1:].repeat(n)) for slot, n in zip(slots[1:], fillers)]
    while not all(job.finished for job in jobs):
        prefiller.run([job for job in jobs if not job.finished])


def plan_memory(model: Any, largest: Prompt, settings: ServiceSettings, max_model_len: int, dtype: torch.dtype,
                device: torch.device, memory: ProcessMemory) -> KVPlan:
    """Measure the largest request's prefill, then fit as many KV blocks as the budget allows."""
    try:
        peak = prefill_peak(model, largest, settings, max_model_len, dtype, device, memory)
    except torch.cuda.OutOfMemoryError:
        raise ModelUnavailable(
            f"the largest request this configuration admits ({largest.length} tokens with {largest.images} image(s) "
            f"of up to {settings.max_pixels} pixels, in prefill passes of {settings.max_num_batched_tokens} tokens) "
            "does not fit the GPU: lower --max-model-len, --max-pixels, --max-images-per-request or "
            "--max-num-batched-tokens, or use a smaller or FP8 checkpoint") from None
    block_bytes = PagedKVCache.bytes_per_token(model.config, dtype) * BLOCK_SIZE
    plan = plan_kv_blocks(budget_bytes=int(settings.memory_budget_gib * GIB), resident_bytes=memory.used(),
                          prefill_peak_bytes=peak, block_bytes=block_bytes, max_len=max_model_len,
                          max_sequences=settings.max_batch_size)
    if plan.full_sequences < 1:
        need = (blocks_for(max_model_len) + 1) * block_bytes  # + the scratch block
        raise ModelUnavailable(
            f"--memory-budget-gib {settings.memory_budget_gib} leaves no room for one sequence of "
            f"--max-model-len {max_model_len} tokens ({need / GIB:.2f} GiB of KV cache): {plan.describe()}. "
            "Lower --max-model-len, --max-pixels or --max-images-per-request, use a smaller or FP8 checkpoint, "
            "or raise the budget if the card has room")
    return plan


def prefill_peak(model: Any, prompt: Prompt, settings: ServiceSettings, max_model_len: int, dtype: torch.dtype,
                 device: torch.device, memory: ProcessMemory) -> int:
    """Bytes the largest prefill pass adds at its peak (torch's peak, or what NVML saw grow), beyond
    the K/V it writes, run as the engine runs it (prefill_for): the prompt's prefill with its last
    piece packed with text prompts to a full pass (filler_lengths), into a pool of its own made
    before measuring."""
    fillers = filler_lengths(prompt.length, settings.max_num_batched_tokens, max_model_len, settings.max_batch_size)
    blocks = max(blocks_for(max_model_len), sum(blocks_for(n) for n in [prompt.length, *fillers]))
    pool = PagedKVCache(model.config, 1 + len(fillers), max_model_len, blocks, dtype=dtype, device=device)
    prefiller = prefill_for(model, Qwen3VLDecoder(model, pool, fuse_projections=True), prompt, settings)
    slots = [pool.allocate(n) for n in [prompt.length, *fillers]]

    def run() -> None:
        run_largest_pass(prefiller, prompt, slots, fillers)
        torch.cuda.synchronize(device)

    # Once first: kernels and library workspaces loaded at their first use stay resident (they are
    # counted there); the second run shows what a prefill itself adds.
    run()
    gc.collect()
    torch.cuda.empty_cache()
    allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    used = memory.used()
    torch.cuda.reset_peak_memory_stats(device)
    run()
    peak = max(torch.cuda.max_memory_allocated(device) - allocated, torch.cuda.max_memory_reserved(device) - reserved,
               memory.used() - used)
    del pool, prefiller
    gc.collect()
    torch.cuda.empty_cache()
    log.info("prefill of %d tokens with %d image(s) in passes of %d tokens (the last filled with %d more): "
             "peak %.2f GiB",
             prompt.length, prompt.images, settings.max_num_batched_tokens, sum(fillers), peak / GIB)
    return peak
