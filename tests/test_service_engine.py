"""The engine driven directly (no HTTP): batching invariants, cancellation, OOM, context limits."""
from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch
from PIL import Image

from tests.engine_faults import fail_next_forward
from service.decode import PagedKVCache
from service.engine import Engine
from service.engine.batch import Batch
from service.engine.detokenizer import IncrementalDetokenizer
from service.engine.sampling import SamplingParams, sample
from service.errors import Cancelled, InvalidRequest, OutOfMemory, Unavailable
from service.settings import ServiceSettings
from service.sizing import GIB, MIB, plan_kv_blocks


def engine_settings(model_dir, **overrides) -> ServiceSettings:
    options = dict(model=str(model_dir), max_model_len=256, min_pixels=3136, max_pixels=16384, max_batch_size=4,
                   max_queue=16, max_tokens_default=400)
    return ServiceSettings(**{**options, **overrides})


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """The engine as the service runs it: Qwen3-VL decoding from the paged cache with service.decode's step."""
    eng = Engine.load(engine_settings(tiny_model_dir))
    assert eng.scheduler.batch.cache.num_slots == 4
    eng.start()
    yield eng
    eng.stop()


def request(engine, text, images=(), **kwargs):
    kwargs.setdefault("max_tokens", 24)
    kwargs.setdefault("temperature", 0.0)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return engine.prepare([{"role": "user", "content": content}], list(images), **kwargs)


def gradient(width, height):
    return Image.linear_gradient("L").resize((width, height)).convert("RGB")


PROMPTS = [
    ("hello", ()),
    ("Describe the image in detail, please.", (gradient(96, 64),)),
    ("Compare these two.", (gradient(64, 64), Image.new("RGB", (128, 64), (9, 99, 199)))),
    ("A much longer text prompt, so that the rows of the batch have quite different lengths to pad.", ()),
]


def test_greedy_output_is_the_same_alone_and_in_a_batch(engine):
    alone = [engine.generate(request(engine, t, i)).token_ids for t, i in PROMPTS]
    with engine.paused():  # all four are admitted in one prefill
        handles = [engine.submit(request(engine, t, i)) for t, i in PROMPTS]
    for h in handles:
        list(h)
    assert [h.token_ids for h in handles] == alone
    assert all(len(ids) == 24 for ids in alone)


def test_requests_joining_a_running_batch_get_the_same_output(engine):
    alone = [engine.generate(request(engine, t, i, max_tokens=40)).token_ids for t, i in PROMPTS]
    engine.scheduler.max_batch_seen = 0
    handles = []
    for text, images in PROMPTS:  # each one joins while the earlier ones are mid-generation
        handles.append(engine.submit(request(engine, text, images, max_tokens=40)))
        while handles[-1].first_token_at is None:
            time.sleep(0.001)
    for h in handles:
        list(h)
    assert [h.token_ids for h in handles] == alone
    assert engine.scheduler.max_batch_seen >= 2


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    def sampled():
        return request(engine, "random words", temperature=1.0, top_p=0.95, top_k=50, seed=7)

    alone = engine.generate(sampled()).token_ids
    with engine.paused():
        handles = [engine.submit(sampled())] + [engine.submit(request(engine, t, i)) for t, i in PROMPTS[:3]]
    for h in handles:
        list(h)
    assert handles[0].token_ids == alone
    other_seed = engine.generate(request(engine, "random words", temperature=1.0, seed=8)).token_ids
    assert other_seed != alone


def test_cancel_frees_the_slot_and_others_continue(engine):
    expected = engine.generate(request(engine, "keep going", max_tokens=60)).token_ids
    with engine.paused():
        doomed = engine.submit(request(engine, "cancel me", max_tokens=200))
        kept = engine.submit(request(engine, "keep going", max_tokens=60))
    while len(doomed.token_ids) < 3:
        time.sleep(0.001)
    doomed.cancel()
    events = list(doomed)
    assert isinstance(events[-1].error, Cancelled)
    assert len(doomed.token_ids) < 200
    list(kept)
    assert kept.token_ids == expected
    deadline = time.monotonic() + 5
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.running == 0 and engine.queue_depth == 0


def test_cancel_while_queued_leaves_the_queue_at_once(engine):
    with engine.paused():
        handle = engine.submit(request(engine, "never runs"))
        assert engine.queue_depth == 1
        handle.cancel()
        assert engine.queue_depth == 0
        assert isinstance(list(handle)[-1].error, Cancelled)


def test_out_of_memory_fails_that_batch_only_and_the_engine_goes_on(engine):
    with engine.paused():
        a = engine.submit(request(engine, "a"))
        b = engine.submit(request(engine, "b", (gradient(64, 64),)))
        fail_next_forward(engine, torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)"))
    for handle in (a, b):
        error = list(handle)[-1].error
        assert isinstance(error, OutOfMemory) and error.status == 503
    after = engine.generate(request(engine, "a"))
    assert after.finish_reason == "length" and after.completion_tokens == 24


def _wait_idle(scheduler, timeout: float = 10.0) -> None:
    """Until the scheduler holds nothing: no row, no prefill, no step in flight, every slot freed (a
    row's slot is freed just after its last event is delivered)."""
    deadline = time.monotonic() + timeout
    while scheduler.running or scheduler.batch.slots or scheduler._inflight is not None:
        assert time.monotonic() < deadline, "the scheduler did not go idle"
        time.sleep(0.002)


@contextlib.contextmanager
def decoding_from(engine, cache: PagedKVCache, chunk: int | None = None):
    """The engine decoding from `cache` (prefill passes of `chunk` tokens) inside the block. The
    batch is swapped in and back only once the scheduler is idle: a row retiring during a swap would
    free its slot in the other batch."""
    scheduler = engine.scheduler
    batch = scheduler.batch
    with engine.paused():
        _wait_idle(scheduler)
        scheduler.batch = Batch.over(engine.model, cache, chunk=chunk, like=batch, context_step=64)
    try:
        yield
    finally:
        with engine.paused():
            _wait_idle(scheduler)
            scheduler.batch = batch


def _with_cache(engine, cache: PagedKVCache, requests: list, chunk: int | None = None) -> list:
    """Run `requests` submitted together on `engine` decoding from `cache` (prefill passes of
    `chunk` tokens); their handles."""
    scheduler = engine.scheduler
    with decoding_from(engine, cache, chunk):
        with engine.paused():
            scheduler.max_batch_seen = 0
            handles = [engine.submit(r) for r in requests]
            assert engine.queue_depth == len(requests)
        for h in handles:
            list(h)
    deadline = time.monotonic() + 5  # the last slot is freed just after its final event is delivered
    while (cache.free_slots < cache.num_slots or cache.free_blocks < cache.num_blocks) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.free_slots == cache.num_slots and cache.free_blocks == cache.num_blocks  # all handed back
    return handles


def test_requests_wait_for_a_free_slot_and_get_the_same_output(engine):
    """With two slots, four requests run two at a time, in order, with the outputs they get alone."""
    requests = [request(engine, f"row {i} " + "pad " * i, max_tokens=12 + 4 * i) for i in range(4)]
    alone = [engine.generate(r).token_ids for r in requests]
    small = PagedKVCache(engine.model.config, 2, engine.max_model_len, dtype=engine.dtype, device=engine.device)
    handles = _with_cache(engine, small, requests)
    assert [h.token_ids for h in handles] == alone
    assert engine.scheduler.max_batch_seen == 2


def test_requests_reserve_blocks_for_their_length_not_the_whole_context(engine):
    """A pool the size of one full-length sequence holds several short requests at once; a request
    that needs more blocks than are free waits for them (in order) and then gets its own output."""
    short = [request(engine, f"short {i}", max_tokens=8) for i in range(3)]
    assert all(r.prompt_tokens + 8 <= 64 for r in short)  # one 64-token block each
    long = request(engine, "a long answer", max_tokens=engine.max_model_len - 40)
    alone = [engine.generate(r).token_ids for r in (*short, long)]
    blocks = -(-engine.max_model_len // 64)  # one max_model_len sequence
    pool = PagedKVCache(engine.model.config, 4, engine.max_model_len, blocks, dtype=engine.dtype, device=engine.device)
    handles = _with_cache(engine, pool, [*short, long])
    assert [h.token_ids for h in handles] == alone
    assert engine.scheduler.max_batch_seen == 3  # the three short ones together; the long one after them


@pytest.mark.parametrize("chunk", [7, 40])
def test_prompts_prefilled_in_small_shared_passes_get_their_own_output(engine, chunk):
    """Passes of 7 tokens cut every prompt (images too) across passes; passes of 40 pack pieces of
    two prompts: each request still gets the tokens it gets alone."""
    alone = [engine.generate(request(engine, t, i)).token_ids for t, i in PROMPTS]
    pool = PagedKVCache(engine.model.config, 4, engine.max_model_len, dtype=engine.dtype, device=engine.device)
    handles = _with_cache(engine, pool, [request(engine, t, i) for t, i in PROMPTS], chunk=chunk)
    assert [h.token_ids for h in handles] == alone


def test_the_prefill_runs_passes_of_the_setting_and_vision_batches_of_the_largest_requests_images(tiny_model_dir):
    """max_num_batched_tokens sets the pass; the vision tower takes as many of the largest request's
    images as such a pass holds (the memory plan measures that request's prefill the same way)."""
    from service.sizing import vision_batch_tokens

    eng = Engine.load(engine_settings(tiny_model_dir, max_num_batched_tokens=128, max_images_per_request=3,
                                     max_pixels=65536))
    prefiller = eng.scheduler.batch.prefiller
    largest = eng.prompts.largest()
    per_image = int(largest.image_grid_thw.prod(-1).max()) // 4
    assert prefiller.chunk == 128 and largest.images == 3 and per_image == 64
    assert prefiller.vision.batch_tokens == vision_batch_tokens(128, per_image, 3) == 2 * per_image  # two of the three


def test_running_requests_keep_decoding_while_a_long_prompt_is_prefilled(engine):
    """A long prompt is prefilled a pass at a time with a decode step between passes: a request
    that is running gets tokens all along, not only after the new prompt's whole prefill."""
    running = request(engine, "keep talking", max_tokens=120)
    long = request(engine, "a long question, " * 18, max_tokens=4)
    passes = -(-long.prompt_tokens // 8)
    assert passes >= 12
    pool = PagedKVCache(engine.model.config, 2, engine.max_model_len, dtype=engine.dtype, device=engine.device)
    with decoding_from(engine, pool, chunk=8):
        first = engine.submit(running)
        while len(first.token_ids) < 2:
            time.sleep(0.001)
        submitted = len(first.token_ids)
        second = engine.submit(long)
        while second.first_token_at is None:
            time.sleep(0.001)
        during = len(first.token_ids) - submitted
        list(second), list(first)
    assert during >= passes // 2  # about one decode step per pass of the long prompt
    assert first.token_ids == engine.generate(running).token_ids  # and the same tokens as alone


def test_out_of_memory_in_a_prefill_fails_the_new_requests_only(engine):
    """CUDA out of memory while new prompts are prefilled, with other requests decoding: the new
    ones get 503, the running ones finish with their own output, the next request works."""
    expected = engine.generate(request(engine, "already running", max_tokens=60)).token_ids
    running = engine.submit(request(engine, "already running", max_tokens=60))
    while len(running.token_ids) < 3:
        time.sleep(0.001)
    with engine.paused():
        newcomers = [engine.submit(request(engine, f"newcomer {i}", (gradient(64, 64),))) for i in range(2)]
        fail_next_forward(engine, torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)"), decode=False)
    for handle in newcomers:
        error = list(handle)[-1].error
        assert isinstance(error, OutOfMemory) and error.status == 503
    list(running)
    assert running.token_ids == expected
    assert engine.generate(request(engine, "a")).completion_tokens == 24
    cache = engine.scheduler.batch.cache
    deadline = time.monotonic() + 5  # the last slot is freed just after its final event is delivered
    while (engine.running or cache.free_slots < cache.num_slots) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.running == 0 and cache.free_slots == cache.num_slots and cache.free_blocks == cache.num_blocks


def test_a_request_cancelled_while_its_prompt_is_prefilled_frees_its_slot(engine):
    scheduler = engine.scheduler
    pool = PagedKVCache(engine.model.config, 2, engine.max_model_len, dtype=engine.dtype, device=engine.device)
    long = request(engine, "a long question, " * 18, max_tokens=4)
    with decoding_from(engine, pool, chunk=4):
        handle = engine.submit(long)
        while not scheduler.batch.jobs:
            time.sleep(0.0005)
        handle.cancel()
        assert isinstance(list(handle)[-1].error, Cancelled)
        deadline = time.monotonic() + 5
        while (scheduler.batch.jobs or pool.free_slots < 2) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert not scheduler.batch.jobs and pool.free_slots == 2 and pool.free_blocks == pool.num_blocks
        assert handle.first_token_at is None


def test_the_budget_is_shared_out_in_blocks():
    block = 64 * 112 * 1024  # Qwen3-VL-2B: 64 tokens of bf16 K/V, 7 MiB
    plan = plan_kv_blocks(budget_bytes=6 * GIB, resident_bytes=int(4.6 * GIB), prefill_peak_bytes=GIB // 4,
                          block_bytes=block, block_size=64, max_len=2048, max_sequences=8, headroom_bytes=GIB // 8)
    assert plan.blocks == 148  # 1.025 GiB left = 149.9 blocks of 7 MiB; one of 149 is the scratch block
    assert plan.tokens == 148 * 64 and plan.full_sequences == 4  # 2048 tokens = 32 blocks
    assert plan.resident + plan.prefill_peak + plan.headroom + plan.kv_bytes <= plan.budget
    none = plan_kv_blocks(budget_bytes=6 * GIB, resident_bytes=int(5.8 * GIB), prefill_peak_bytes=GIB // 4,
                          block_bytes=block, block_size=64, max_len=2048, max_sequences=8)
    assert none.blocks == 0 and none.full_sequences == 0
    big = plan_kv_blocks(budget_bytes=80 * GIB, resident_bytes=4 * GIB, prefill_peak_bytes=GIB, block_bytes=block,
                         block_size=64, max_len=2048, max_sequences=8)
    assert big.blocks == 8 * 32 and big.full_sequences == 8  # no more than max_sequences can use
    assert "9472 tokens in 148 blocks of 64; 4 sequence(s) of 2048" in plan.describe()
    assert MIB * 7 == block


def test_the_batch_size_check_counts_what_the_cache_and_the_decode_step_allocate(engine):
    """startup.check_batch_fits refuses a --max-batch-size from these figures (tests/test_service_startup.py
    the refusal): each is what the engine's buffers hold, a slot at a time."""
    from service.decode import DecodeRunner
    from service.sizing import BLOCK_SIZE, blocks_for

    cache, runner = engine.scheduler.batch.cache, engine.scheduler.batch.runner
    slots = cache.num_slots

    def per_slot(*tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors) // slots

    assert PagedKVCache.slot_bytes(cache.max_len) == per_slot(cache.block_table, cache.lengths_dev)
    assert DecodeRunner.slot_bytes(runner.decoder.vocab_size) == per_slot(runner.logits, runner._inputs)
    block_bytes = PagedKVCache.bytes_per_token(engine.model.config, engine.dtype) * BLOCK_SIZE
    assert cache.nbytes == (slots * blocks_for(cache.max_len) + 1) * block_bytes  # the CPU's pool: whole contexts


def test_generation_stops_at_the_context_limit(engine):
    req = request(engine, "fill the context", max_tokens=None)
    result = engine.generate(req)
    assert result.finish_reason == "length"
    assert result.prompt_tokens + result.completion_tokens == engine.max_model_len


def test_prompt_too_long_names_both_lengths(engine):
    with pytest.raises(InvalidRequest) as info:
        request(engine, "word " * 400)
    assert "maximum context length is 256 tokens" in info.value.message and info.value.param == "input_tokens"
    assert int(info.value.message.split("your prompt contains ")[1].split()[0]) == info.value.value > 256
    with pytest.raises(InvalidRequest, match=r"you requested 250 output tokens and your prompt contains \d+ input"):
        request(engine, "short", max_tokens=250)
    with pytest.raises(InvalidRequest, match="max_tokens=300 cannot be greater than max_model_len"):
        request(engine, "short", max_tokens=300)


def test_too_many_images_is_refused_before_processing(engine):
    limit = engine.settings.max_images_per_request  # the default: one image over it is refused
    with pytest.raises(InvalidRequest, match=f"At most {limit} image.*got {limit + 1}"):
        request(engine, "one too many", [gradient(32, 32)] * (limit + 1))


# ---- pieces ------------------------------------------------------------------------------------------


def test_detokenizer_holds_back_a_partial_stop_string(engine):
    tok = engine.tokenizer
    ids = tok("The quick brown fox jumps over the lazy dog.")["input_ids"]
    detok = IncrementalDetokenizer(tok, stop=("lazy dog",))
    released = "".join(detok.add(i) for i in ids)
    assert detok.stopped
    assert released == "The quick brown fox jumps over the "
    detok = IncrementalDetokenizer(tok, stop=("lazy cat",))
    released = "".join(detok.add(i) for i in ids) + detok.flush()
    assert not detok.stopped and released == "The quick brown fox jumps over the lazy dog."


def test_detokenizer_never_splits_a_character(engine):
    tok = engine.tokenizer
    text = "caf\u00e9 \u732b \U0001F431 ok"
    pieces = []
    detok = IncrementalDetokenizer(tok)
    for i in tok(text)["input_ids"]:
        pieces.append(detok.add(i))
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_detokenizer_work_per_token_stays_bounded_on_bytes_that_never_decode(engine):
    """Byte 0xFF is never valid UTF-8, and allowed_token_ids (or logit_bias) can make a request sample
    only it: the text never decodes cleanly, and every token decoded the whole run again (quadratic,
    in the scheduler thread: 30000 such tokens cost each step of every row ~10 ms). The text is as
    before: nothing while the run lasts, then its U+FFFDs with the character that ends it."""
    tok = engine.tokenizer
    decoded: list[int] = []

    class Counting:
        eos_token_id = tok.eos_token_id

        def decode(self, ids, **kwargs):
            decoded.append(len(ids))
            return tok.decode(ids, **kwargs)

    detok = IncrementalDetokenizer(Counting())
    run = 3000
    assert [detok.add(tok.convert_tokens_to_ids("\u00ff")) for _ in range(run)] == [""] * run
    assert detok.add(tok.convert_tokens_to_ids("a")) == "\ufffd" * run + "a"
    assert sum(decoded) < 100 * run, sum(decoded)  # it was ~run**2


def test_sampling_filters_reduce_to_greedy():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1)
    params = [SamplingParams(8, temperature=0.9, top_k=1), SamplingParams(8, temperature=1.5, top_p=1e-6),
              SamplingParams(8, temperature=0.0)]
    for _ in range(5):
        assert torch.equal(sample(logits, params, [None, None, None]), greedy)


def test_a_reader_that_fell_behind_gets_the_waiting_text_merged(engine):
    import asyncio

    from service.engine import Event, RequestHandle

    async def read():
        handle = RequestHandle(request(engine, "x"), loop=asyncio.get_running_loop())
        for event in (Event(text="a"), Event(text="b"), Event(text="c", finish_reason="stop", completion_tokens=3)):
            handle._queue.put_nowait(event)
        return [event async for event in handle]

    events = asyncio.run(read())
    assert [(e.text, e.finish_reason, e.completion_tokens) for e in events] == [("abc", "stop", 3)]


def test_merging_a_long_backlog_takes_linear_time(engine):
    """Each waiting event was merged into a new event copying the text, token ids and logprobs so
    far: quadratic, in the event loop (a stream whose client read nothing for 100000 tokens: ~13 s
    there before anything was sent, every other request waiting)."""
    import asyncio

    from service.engine import Event, RequestHandle
    from service.engine.logits import TokenLogprob

    entry, count = TokenLogprob(1, -1.0, [(2, -2.0)]), 100_000

    async def read():
        handle = RequestHandle(request(engine, "x"), loop=asyncio.get_running_loop())
        for _ in range(count):
            handle._queue.put_nowait(Event(text="ab", token_ids=[1], logprobs=[entry]))
        handle._queue.put_nowait(Event(text="!", finish_reason="length", completion_tokens=count + 1))
        started = time.perf_counter()
        events = [event async for event in handle]
        return events, time.perf_counter() - started

    events, seconds = asyncio.run(read())
    assert [(len(e.text), len(e.token_ids), len(e.logprobs), e.finish_reason) for e in events] == \
        [(2 * count + 1, count, count, "length")]
    assert seconds < 2.0, seconds


def _hits(engine) -> float:
    return engine.metrics.prefix_cache_hits._value.get()


def test_a_repeated_prompt_is_taken_from_the_prefix_cache_with_the_same_output(engine):
    image = Image.new("RGB", (96, 64), (200, 30, 30))
    long_question = "Describe what you see in great detail, " * 5
    first = request(engine, long_question + "first.", images=[image], max_tokens=8)
    assert first.prompt_tokens > 64
    before = _hits(engine)
    alone = engine.generate(first).token_ids
    again = engine.generate(first).token_ids  # the same request: its full blocks come from the cache
    assert again == alone and _hits(engine) - before >= 64
    other_image = request(engine, long_question + "first.", images=[Image.new("RGB", (96, 64), (30, 30, 200))],
                          max_tokens=8)
    before = _hits(engine)
    engine.generate(other_image)
    assert _hits(engine) == before  # the same token ids, another image: nothing shared
    follow_up = request(engine, long_question + "second.", images=[image], max_tokens=8)
    before = _hits(engine)
    result = engine.generate(follow_up).token_ids
    assert _hits(engine) - before >= 64  # the same image and text before it: shared
    fresh = PagedKVCache(engine.model.config, 2, engine.max_model_len, dtype=engine.dtype, device=engine.device)
    [again] = _with_cache(engine, fresh, [follow_up])  # nothing in this cache: a fresh engine would not differ
    assert again.token_ids == result


def test_requests_that_start_alike_and_arrive_together_compute_the_shared_prefix_once(engine):
    """The same image and question sent four times at once (a client's retries, a batch job): the
    first computes the prompt, the others wait for its blocks and take them from the prefix cache
    (with the same output), instead of each computing the same prompt beside it."""
    image = Image.new("RGB", (96, 64), (20, 160, 90))
    same = [request(engine, "Describe what you see in great detail, " * 5, images=[image], max_tokens=8)
            for _ in range(4)]
    full_blocks = len(same[0].prompt.shareable_hashes)
    assert full_blocks >= 1
    before = _hits(engine)
    with engine.paused():  # admitted in one iteration
        handles = [engine.submit(r) for r in same]
    outputs = [list(h) and h.token_ids for h in handles]
    assert _hits(engine) - before >= 3 * full_blocks * 64  # each of the other three shared every full block
    assert all(out == outputs[0] for out in outputs)
    assert outputs[0] == engine.generate(same[0]).token_ids


def test_a_text_that_spells_the_image_placeholder_is_served_without_caching(engine):
    pad = engine.tokenizer.convert_ids_to_tokens(engine.model.config.image_token_id)
    req = request(engine, f"what is {pad}{pad} here, " * 10, max_tokens=4)
    assert req.prompt_tokens > 64 and req.prompt.block_hashes == []  # image tokens with no image: not shared
    result = engine.generate(req)
    assert result.completion_tokens == 4 and result.finish_reason == "length"


def test_a_request_that_waits_for_blocks_as_the_engine_drains_gets_503_not_silence(tiny_model_dir):
    """A shutdown starting while the scheduler holds the first queued request (it waits for blocks,
    so it goes back to the queue): that request ends with a 503 instead of waiting for ever."""
    engine = Engine.load(engine_settings(tiny_model_dir, warmup=False))
    engine.start()
    try:
        batch = engine.scheduler.batch
        start = batch.start

        def drained_while_starting(*args, **kwargs):  # the drain lands between the queue and the batch
            batch.start = start
            engine.drain()
            return False  # no blocks free: it would go back to the queue

        with engine.paused():
            handle = engine.submit(request(engine, "waiting for blocks"))
            batch.start = drained_while_starting
        events = []
        waiter = threading.Thread(target=lambda: events.extend(handle), daemon=True)
        waiter.start()
        waiter.join(10)
        assert not waiter.is_alive(), "the request was left waiting"
        assert isinstance(events[-1].error, Unavailable) and events[-1].error.status == 503
    finally:
        engine.stop()


@pytest.mark.parametrize("length, chunk, context, fillers", [
    (4095, 4096, 4096, [1]),            # the 16 GiB card's 2B plan: one pass, one token short
    (4095, 1024, 4096, [1]),            # 8 GiB: four passes, the last 1023 tokens
    (1999, 4096, 2000, [1999, 98]),     # a short context: other prompts fill the pass, each under the context
    (2048, 1024, 4096, []),             # the last pass is full already
])
def test_the_memory_plan_fills_the_largest_prompts_last_pass(length, chunk, context, fillers):
    from service.engine.startup import filler_lengths

    assert filler_lengths(length, chunk, context, max_prompts=8) == fillers
    assert (length - 1) % chunk + 1 + sum(fillers) == chunk
    assert all(0 < n < context for n in fillers)


def test_no_more_prompts_fill_the_pass_than_the_batch_has_rows():
    """A pass far larger than the batch's prompts can fill is measured as full as they make it."""
    from service.engine.startup import filler_lengths

    assert filler_lengths(511, 100_000, 512, max_prompts=4) == [511, 511, 511]
    assert filler_lengths(511, 100_000, 512, max_prompts=1) == []


def test_the_measured_prefill_ends_with_a_full_pass_at_the_whole_prefix(engine):
    """run_largest_pass (what the start-up measures on CUDA): the largest prompt's passes, its last
    piece packed with text prompts to a full pass; the prompt is prefilled as the engine does it."""
    from service.decode.qwen3_prefill import Qwen3VLPrefill
    from service.engine.startup import filler_lengths, run_largest_pass

    prompt = engine.prompts.largest()
    chunk = 100
    fillers = filler_lengths(prompt.length, chunk, engine.max_model_len, engine.settings.max_batch_size)
    assert fillers
    pool = PagedKVCache(engine.model.config, 1 + len(fillers), engine.max_model_len, dtype=engine.dtype,
                        device=engine.device)
    prefiller = Qwen3VLPrefill(engine.model, Batch.over(engine.model, pool, like=engine.scheduler.batch).runner.decoder,
                               chunk)
    passes = []
    plan = prefiller.plan_pass
    prefiller.plan_pass = lambda jobs, max_images=None: passes.append(plan(jobs, max_images)) or passes[-1]
    slots = [pool.allocate(n) for n in [prompt.length, *fillers]]
    run_largest_pass(prefiller, prompt, slots, fillers)
    last = passes[-1]
    assert sum(end - start for _, start, end in last) == chunk  # a full pass
    assert last[0][2] == prompt.length  # whose first piece ends the largest prompt, after all of its prefix
    assert pool.lengths[slots[0]] == prompt.length


@pytest.mark.parametrize(("device", "omp", "expected"), [("cuda", None, [1]), ("cuda", "4", []), ("cpu", None, [])])
def test_on_a_gpu_requests_prepare_with_one_cpu_thread_each_unless_omp_num_threads_says(monkeypatch, device, omp,
                                                                                         expected):
    """vLLM's rule for its processor: torch's intra-op threads are 1 on a GPU (each request's image
    processing runs in a thread of its own), OMP_NUM_THREADS where set; on the CPU the model needs them."""
    from service.engine.startup import limit_cpu_threads

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    limit_cpu_threads(torch.device(device))
    assert calls == expected


def test_a_context_too_short_for_the_warm_up_image_warms_up_with_text(tiny_model_dir):
    """min_pixels scales the warm-up's small image to 88 tokens: with --max-model-len 80 the service
    died at warm-up with a context error for a request nobody sent; the warm-up is text there."""
    eng = Engine.load(engine_settings(tiny_model_dir, max_model_len=80, min_pixels=65536, max_pixels=1003520))
    warmup = eng.prompts.warmup_request()
    assert warmup.prompt.images == 0 and warmup.prompt_tokens + 2 <= 80
    eng.start()
    try:
        assert eng.ready
    finally:
        eng.stop()
