"""The Triton split-KV decode attention over the paged pool against SDPA on gathered keys.

On the GPU in bf16 at the real head sizes; on a machine without one, the same kernels run in
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET) in float32 on small shapes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from service.decode.attention import BLOCK, decode_attention_triton, triton_available

on_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()),
                            reason="the Triton kernels need a CUDA GPU")


def reference(q, k_new, v_new, keys, values, table, lengths, write_at, context_len, scale):
    """Write the new K/V at their flat positions, gather each row's keys through its table, SDPA."""
    keys[:, write_at] = k_new.transpose(0, 1)
    values[:, write_at] = v_new.transpose(0, 1)
    rows, blocks = q.shape[0], -(-context_len // BLOCK)
    index = (table[:, :blocks].long()[:, :, None] * BLOCK + torch.arange(BLOCK, device=q.device)).reshape(rows, -1)
    row_keys = keys[:, index].transpose(0, 1)[:, :, :context_len]  # [rows, Hkv, L, D]
    row_values = values[:, index].transpose(0, 1)[:, :, :context_len]
    attend = torch.arange(context_len, device=q.device)[None, :] <= lengths[:, None]
    mask = torch.where(attend, 0.0, float("-inf"))[:, None, None, :]
    return F.scaled_dot_product_attention(q.float(), row_keys.float(), row_values.float(), attn_mask=mask, scale=scale)


@on_gpu
@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("context_len", [64, 1000, 4096])
def test_triton_decode_attention_matches_sdpa_and_writes_the_new_kv(groups, context_len):
    check_against_sdpa(groups, context_len, kv_heads=8, dim=128, max_len=4096, device="cuda", dtype=torch.bfloat16,
                       tolerance=2e-2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the real kernels above")
@pytest.mark.parametrize("groups, context_len", [(2, 64), (4, 200)])
def test_triton_decode_attention_in_the_interpreter(groups, context_len):
    pytest.importorskip("triton")
    check_against_sdpa(groups, context_len, kv_heads=2, dim=16, max_len=256, device="cpu", dtype=torch.float32,
                       tolerance=1e-5)


def check_against_sdpa(groups, context_len, *, kv_heads, dim, max_len, device, dtype, tolerance):
    torch.manual_seed(context_len + groups)
    rows = 4
    max_blocks = max_len // BLOCK
    pool_blocks = rows * max_blocks + 3  # the last one is scratch
    keys = torch.randn(kv_heads, (pool_blocks + 1) * BLOCK, dim, device=device, dtype=dtype)
    values = torch.randn_like(keys)
    # Each row's blocks scattered over the pool (a permutation), as a paged cache leaves them.
    table = torch.randperm(pool_blocks, device=device)[:rows * max_blocks].reshape(rows, max_blocks).int()
    # Strided views, as the decode step passes them: slices of one projection output.
    qkv = torch.randn(rows, kv_heads * (groups + 2), dim, device=device, dtype=dtype)
    q = qkv[:, :kv_heads * groups].reshape(rows, kv_heads, groups, dim)
    k_new, v_new = qkv[:, kv_heads * groups:kv_heads * (groups + 1)], qkv[:, kv_heads * (groups + 1):]
    lengths = torch.tensor([0, context_len - 1, context_len // 3, 17 % context_len], device=device)
    active = torch.tensor([True, True, False, True], device=device)
    physical = table.gather(1, (lengths // BLOCK)[:, None])[:, 0].long() * BLOCK + lengths % BLOCK
    write_at = torch.where(active, physical, pool_blocks * BLOCK)  # inactive: the scratch block
    ref_keys, ref_values = keys.clone(), values.clone()
    expected = reference(q, k_new, v_new, ref_keys, ref_values, table, lengths, write_at, context_len, dim ** -0.5)
    out = decode_attention_triton(q, k_new, v_new, keys, values, table, lengths, write_at, context_len, dim ** -0.5)
    if device == "cuda":
        torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == q.dtype
    # Rows that are not decoding (row 2) compute garbage that is ignored; their blocks stay as they were.
    assert (out.float() - expected)[active].abs().max().item() < tolerance
    scratch = slice(pool_blocks * BLOCK, None)  # several inactive rows may race there: not compared
    assert torch.equal(keys[:, :scratch.start], ref_keys[:, :scratch.start])
    assert torch.equal(values[:, :scratch.start], ref_values[:, :scratch.start])  # same writes, nothing else
