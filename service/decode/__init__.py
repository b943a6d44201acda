"""Fast decoding for the engine: a slot KV cache, an explicit Qwen3-VL decode step, CUDA graphs.

Use (one engine on CPU and CUDA)::

    cache = SlotKVCache.from_budget(model.config, kv_gib, max_len, dtype=model.dtype,
                                    device=model.device, max_slots=max_batch)
    runner = DecodeRunner(Qwen3VLDecoder(model, cache))
    runner.capture()                                   # CUDA: graphs at start-up; CPU: no-op
    slot = cache.allocate()
    pf = prefill(model, **processor_outputs)           # left-padded batch, logits of the last position
    cache.load_prefill(slot, pf.past_key_values, pf.lengths[0], row=0, rope_delta=pf.rope_deltas[0])
    logits = runner.decode([slot], [first_token])      # [1, vocab] float32; then sample, repeat
    cache.free(slot)
"""
from service.decode.cache import SlotKVCache
from service.decode.graphs import DecodeRunner, context_buckets
from service.decode.prefill import Prefill, prefill, prefill_position_ids
from service.decode.qwen3_step import Qwen3VLDecoder

__all__ = ["SlotKVCache", "Qwen3VLDecoder", "DecodeRunner", "context_buckets", "Prefill", "prefill",
           "prefill_position_ids"]
