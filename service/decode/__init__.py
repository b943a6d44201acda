"""Fast decoding for the engine: a paged KV cache, an explicit Qwen3-VL prefill and decode step, CUDA graphs.

Use (one engine on CPU and CUDA)::

    cache = PagedKVCache(model.config, num_slots=8, max_len=4096, num_blocks=400, dtype=model.dtype,
                         device=model.device)
    decoder = Qwen3VLDecoder(model, cache)
    runner = DecodeRunner(decoder)
    runner.capture()                                   # CUDA: graphs at start-up; CPU: no-op
    slot = cache.allocate(prompt_len + max_new_tokens) # reserves the blocks it may fill
    logits = Qwen3VLPrefill(model, decoder).prefill(slot, input_ids, mrope_positions, rope_delta,
                                                    pixel_values, image_grid_thw)  # [vocab] float32
    logits = runner.decode([slot], [first_token])      # [1, vocab] float32; then sample, repeat
    cache.free(slot)

(The engine runs several prompts' prefills in shared passes between decode steps: service/engine/batch.py.)
"""
from service.decode.cache import BLOCK_SIZE, PagedKVCache
from service.decode.graphs import DecodeRunner, context_buckets
from service.decode.qwen3_prefill import Qwen3VLPrefill
from service.decode.qwen3_step import Qwen3VLDecoder

__all__ = ["BLOCK_SIZE", "PagedKVCache", "Qwen3VLDecoder", "Qwen3VLPrefill", "DecodeRunner", "context_buckets"]
