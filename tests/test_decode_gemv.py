"""The skinny GEMM of the decode step (service/decode/gemv.py) against F.linear, and the choice
between it and cuBLAS. On a machine without a GPU the kernel runs in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET), in float32: the same program, checked element by element."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from service.decode.gemv import LinearChoice, skinny_linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def silu_mul(gate, up):
    return F.silu(gate) * up


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("rows, n, k", [(1, 48, 64), (3, 100, 130), (7, 33, 70), (16, 64, 256)])
def test_skinny_linear_is_f_linear(rows, n, k, silu, dtype):
    torch.manual_seed(rows * n + k)
    weight = torch.randn(n, k, device=DEVICE, dtype=dtype)
    x = torch.randn(rows, 2 * k if silu else k, device=DEVICE, dtype=dtype)
    out = skinny_linear(x, weight, silu_mul=silu)
    expected = F.linear(silu_mul(*x.float().chunk(2, dim=-1)) if silu else x.float(), weight.float())
    assert out.shape == (rows, n) and out.dtype == dtype
    error = ((out.float() - expected).norm() / expected.norm()).item()
    assert error < (1e-5 if dtype == torch.float32 else 1e-2)


def test_skinny_linear_refuses_shapes_it_does_not_compute():
    weight = torch.randn(8, 16, device=DEVICE)
    with pytest.raises(ValueError):
        skinny_linear(torch.randn(17, 16, device=DEVICE), weight)  # more rows than one tile
    with pytest.raises(ValueError):
        skinny_linear(torch.randn(2, 16, device=DEVICE), weight, silu_mul=True)  # silu_mul wants [M, 2K]


def test_a_candidate_kernel_is_kept_only_where_it_agrees_and_is_clearly_faster(monkeypatch):
    """The rule both projection choices (bf16 and FP8) share; the device timing is the one fake:
    each product's time is what the test says it is."""
    import service.decode.kernel_choice as kernel_choice

    x, weight = torch.randn(4, 32), torch.randn(16, 32)
    exact = lambda: F.linear(x, weight)  # noqa: E731
    wrong = lambda: F.linear(x, weight) + 1.0  # noqa: E731
    slightly = lambda: F.linear(x, weight) * (1 + 1e-4)  # noqa: E731

    def broken():
        raise RuntimeError("no kernel for this GPU")

    micros = {exact: 10.0, slightly: 9.0, wrong: 5.0}
    monkeypatch.setattr(kernel_choice, "graph_time", lambda fn, repeats=10: micros.get(fn, 9.8))
    choice = kernel_choice.KernelChoice("test")
    choice.measure("faster, agrees", exact, {"candidate": slightly}, tolerance=1e-2)
    choice.measure("faster, wrong", exact, {"candidate": wrong}, tolerance=1e-2)
    choice.measure("2% faster only", exact, {"candidate": lambda: F.linear(x, weight)}, tolerance=1e-2)  # 9.8 us
    choice.measure("cannot run", exact, {"candidate": broken}, tolerance=1e-2)
    assert choice.chosen == {"faster, agrees": "candidate"}
    assert "faster, agrees" in choice and "faster, wrong" not in choice
    assert choice.timings["faster, agrees"] == {"baseline": 10.0, "candidate": 9.0}
    assert choice.timings["cannot run"] == {"baseline": 10.0}
    faster = lambda: F.linear(x, weight) * (1 - 1e-4)  # noqa: E731
    micros[faster] = 8.0
    choice.measure("several", exact, {"slow": slightly, "wrong": wrong, "fast": faster, "broken": broken},
                   tolerance=1e-2)
    assert choice.get("several") == "fast"  # the fastest that agrees; the wrong one (5 us) never counts
    assert choice.get("faster, wrong") is None
    choice.measure("faster, wrong", exact, {"candidate": slightly}, tolerance=1e-2)  # measured once per shape
    assert "faster, wrong" not in choice
    choice.report()


def test_a_choice_routes_only_the_chosen_shapes_to_the_kernel(monkeypatch):
    calls = []
    import service.decode.gemv as gemv

    monkeypatch.setattr(gemv, "skinny_linear", lambda *a, **k: calls.append(a[0].shape) or skinny_linear(*a, **k))
    choice = LinearChoice()
    weight = torch.randn(24, 32, device=DEVICE)
    x = torch.randn(2, 64, device=DEVICE)
    expected = F.linear(silu_mul(*x.chunk(2, dim=-1)), weight)
    assert torch.allclose(choice(x, weight, activation=silu_mul), expected, atol=1e-5) and not calls
    choice.skinny.chosen[(2, 24, 32, True)] = "skinny"  # as measure() keeps a shape the kernel ran faster
    assert torch.allclose(choice(x, weight, activation=silu_mul), expected, atol=1e-5) and calls == [(2, 64)]
    assert torch.allclose(choice(x[:, :32], weight), F.linear(x[:, :32], weight), atol=1e-5)  # another key
    assert calls == [(2, 64)]
    choice.measure([(weight, False)], [1, 2], silu_mul)  # nothing to time without a GPU: no choice changes
    assert choice.skinny.chosen == {(2, 24, 32, True): "skinny"} or DEVICE == "cuda"


@pytest.mark.skipif(DEVICE != "cuda", reason="cuBLAS workspaces are a CUDA matter")
def test_the_start_up_timing_leaves_no_memory_behind():
    """Timing many shapes (as the start-up does, each in its own CUDA graph) and then releasing
    the workspaces leaves torch's allocations where they were: a stream per timing once kept a
    32 MiB cuBLAS workspace each, 0.5 GiB outside the memory plan."""
    from service.decode.kernel_choice import release_workspaces

    import gc

    weights = [(torch.randn(n, 1024, device=DEVICE, dtype=torch.bfloat16), False) for n in (256, 384, 512, 640)]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    choice = LinearChoice()
    choice.measure(weights, [1, 2, 4, 8, 16], lambda gate, up: gate * up)
    assert len(choice.skinny.timings) == 20
    release_workspaces()
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < 40 * 2**20


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, tests/test_decode_step.py runs the real kernels")
def test_the_decode_step_on_the_triton_kernels_decodes_like_transformers():
    """The step with the Triton split-KV attention and every projection on the skinny kernel
    (interpreted): greedy tokens and logits as transformers' own decoding."""
    from tests.test_decode_step import batch_inputs, hf_greedy, text_prompt, tiny_config
    from bench.hf_prefill import load_prefill, prefill
    from service.decode import DecodeRunner, PagedKVCache, Qwen3VLDecoder
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(tiny_config()).eval()
    rows = [text_prompt(9, seed=1), text_prompt(14, seed=2)]
    inputs = batch_inputs(rows)
    cache = PagedKVCache(model.config, 2, 128, dtype=torch.float32, device="cpu")  # 64-token blocks, as the kernel walks
    decoder = Qwen3VLDecoder(model, cache, attention="triton", fuse_projections=True)
    layer = decoder.layers[0]
    for m in (1, 2):
        for weight, silu in ((decoder.qkv_proj[0].weight, False), (decoder.gate_up_proj[0].weight, False),
                             (layer.self_attn.o_proj.weight, False), (layer.mlp.down_proj.weight, True)):
            decoder.linear.skinny.chosen[(m, weight.shape[0], weight.shape[1], silu)] = "skinny"
    runner = DecodeRunner(decoder, context_step=64)
    pf = prefill(model, **inputs)
    slots = [cache.allocate(40) for _ in rows]
    for row, slot in enumerate(slots):
        load_prefill(cache, slot, pf.past_key_values, pf.lengths[row], row=row, rope_delta=pf.rope_deltas[row])
    tokens, logits = [pf.logits.argmax(-1)], [pf.logits]
    for _ in range(5):
        logits.append(runner.decode(slots, tokens[-1].tolist()).clone())
        tokens.append(logits[-1].argmax(-1))
    ref_tokens, ref_logits = hf_greedy(model, 6, inputs)
    assert torch.equal(torch.stack(tokens, 1), ref_tokens)
    assert (torch.stack(logits) - ref_logits).abs().max() < 1e-4
