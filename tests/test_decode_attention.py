"""The Triton split-KV decode attention against the SDPA path it replaces (GPU only)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from service.decode.attention import decode_attention_triton, triton_available

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()),
                                reason="the Triton kernels need a CUDA GPU")


def reference(q, k_new, v_new, keys, values, lengths, write_at, context_len, scale):
    rows = q.shape[0]
    index = torch.arange(rows, device=q.device)
    keys[index, :, write_at] = k_new
    values[index, :, write_at] = v_new
    attend = torch.arange(context_len, device=q.device)[None, :] <= lengths[:, None]
    mask = torch.where(attend, 0.0, float("-inf")).to(q.dtype)[:, None, None, :]
    return F.scaled_dot_product_attention(q.float(), keys[:rows, :, :context_len].float(),
                                          values[:rows, :, :context_len].float(), attn_mask=mask.float(), scale=scale)


@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("context_len", [64, 1000, 4096])
def test_triton_decode_attention_matches_sdpa_and_writes_the_new_kv(groups, context_len):
    torch.manual_seed(context_len + groups)
    slots, kv_heads, dim, max_len = 5, 8, 128, 4096
    rows = 4
    keys = torch.randn(slots, kv_heads, max_len + 1, dim, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    # Strided views, as the decode step passes them: slices of one projection output.
    qkv = torch.randn(rows, kv_heads * (groups + 2), dim, device="cuda", dtype=torch.bfloat16)
    q = qkv[:, :kv_heads * groups].reshape(rows, kv_heads, groups, dim)
    k_new, v_new = qkv[:, kv_heads * groups:kv_heads * (groups + 1)], qkv[:, kv_heads * (groups + 1):]
    lengths = torch.tensor([0, context_len - 1, context_len // 3, 17 % context_len], device="cuda")
    active = torch.tensor([True, True, False, True], device="cuda")
    write_at = torch.where(active, lengths, max_len)
    ref_keys, ref_values = keys.clone(), values.clone()
    expected = reference(q, k_new, v_new, ref_keys, ref_values, lengths, write_at, context_len, dim ** -0.5)
    out = decode_attention_triton(q, k_new, v_new, keys, values, lengths, write_at, context_len, dim ** -0.5)
    torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == q.dtype
    # Rows that are not decoding (row 2) compute garbage that is ignored; their cache stays as it was.
    assert (out.float() - expected)[active].abs().max().item() < 2e-2
    assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values)  # same writes, nothing else touched
