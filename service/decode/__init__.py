"""Fast decoding for the engine: a paged KV cache, an explicit Qwen3-VL decode step, CUDA graphs.

Use (one engine on CPU and CUDA)::

    cache = PagedKVCache(model.config, num_slots=8, max_len=4096, num_blocks=400, dtype=model.dtype,
                         device=model.device)
    runner = DecodeRunner(Qwen3VLDecoder(model, cache))
    runner.capture()                                   # CUDA: graphs at start-up; CPU: no-op
    slot = cache.allocate(prompt_len + max_new_tokens) # reserves the blocks it may fill
    pf = prefill(model, **processor_outputs)           # left-padded batch, logits of the last position
    cache.load_prefill(slot, pf.past_key_values, pf.lengths[0], row=0, rope_delta=pf.rope_deltas[0])
    logits = runner.decode([slot], [first_token])      # [1, vocab] float32; then sample, repeat
    cache.free(slot)

(The engine prefills with ``Qwen3VLPrefill(model, decoder).prefill(slot, ...)`` instead: image by image and
chunk by chunk, straight into the slot's blocks.)
"""
from service.decode.cache import BLOCK_SIZE, PagedKVCache
from service.decode.graphs import DecodeRunner, context_buckets
from service.decode.prefill import Prefill, prefill, prefill_position_ids
from service.decode.qwen3_prefill import Qwen3VLPrefill
from service.decode.qwen3_step import Qwen3VLDecoder

__all__ = ["BLOCK_SIZE", "PagedKVCache", "Qwen3VLDecoder", "Qwen3VLPrefill", "DecodeRunner", "context_buckets",
           "Prefill", "prefill", "prefill_position_ids"]
