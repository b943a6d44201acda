"""Attention of one new token per row over its slot's cached keys, and the write of its K/V.

The decoder's default (any device) writes the K/V with index writes and calls
``scaled_dot_product_attention`` with an additive mask. On CUDA this module does the same in two
Triton kernels, split-KV "flash-decoding". A one-token query gives SDPA kernels only
  batch x kv-heads blocks of work (8 for Qwen3-VL-2B), each walking the whole context: measured on an
  H100, 24 us a layer at 1k context where reading the keys needs ~1.5 us. Here each block takes 64
  positions of one (row, kv head) for all the query heads sharing it, a second kernel merges the
  blocks' partial softmaxes, blocks past a row's length end at once (so coarse context buckets cost
  little), and the block holding the new position writes the token's K/V into the cache itself
  (no separate index writes).

Row ``b`` attends to positions ``0..lengths[b]`` of its sequence, position ``lengths[b]`` being the
new token. The cache is paged: logical block ``j`` of row ``b`` (positions ``j*BLOCK..``) lives in
pool block ``table[b, j]``, so a block of work is one block of the pool. The new K/V are stored at
the flat pool position ``write_at[b]`` (its place in the row's blocks, or the scratch block for rows
that are not decoding).
"""
from __future__ import annotations

import torch

from service.sizing import BLOCK_SIZE as BLOCK  # positions per block of work: one KV cache block

try:  # CUDA builds of torch ship Triton; the CPU wheel does not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

MAX_SPLITS = 32  # blocks per (row, kv head) at most; longer contexts loop inside a block


def triton_available() -> bool:
    return triton is not None


def decode_attention_triton(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, keys: torch.Tensor,
                            values: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor, write_at: torch.Tensor,
                            context_len: int, scale: float, block_size: int = BLOCK) -> torch.Tensor:
    """q ``[B, Hkv, G, D]`` (G query heads per kv head), k_new/v_new ``[B, Hkv, D]``, keys/values the
    pools ``[Hkv, P, D]``, table ``[B, blocks]`` (int32 pool block of each logical block); returns
    ``[B, Hkv, G, D]``. Reads positions below ``context_len`` only (it must exceed every length)."""
    if block_size != BLOCK:
        raise ValueError(f"the Triton attention walks blocks of {BLOCK} tokens, not {block_size}")
    rows, kv_heads, groups, dim = q.shape
    blocks = triton.cdiv(context_len, BLOCK)
    per_split = triton.cdiv(blocks, MAX_SPLITS)  # blocks one program walks
    splits = triton.cdiv(blocks, per_split)
    # Rows may be strided views (slices of one projection output); within a row, heads must be packed.
    if q.stride()[1:] != (groups * dim, dim, 1):
        q = q.contiguous()
    k_new = k_new if k_new.stride()[1:] == (dim, 1) else k_new.contiguous()
    v_new = v_new if v_new.stride()[1:] == (dim, 1) else v_new.contiguous()
    partial = torch.empty((rows, kv_heads, groups, splits, dim), device=q.device, dtype=torch.float32)
    lse = torch.empty((rows, kv_heads, groups, splits), device=q.device, dtype=torch.float32)
    _split_kernel[(rows, kv_heads, splits)](
        q, k_new, v_new, keys, values, table, lengths, write_at, partial, lse,
        q.stride(0), k_new.stride(0), v_new.stride(0), keys.stride(0), keys.stride(1), table.stride(0), scale,
        KV_HEADS=kv_heads, GROUPS=groups, GROUPS_PAD=max(16, triton.next_power_of_2(groups)), DIM=dim,
        BLOCK=BLOCK, PER_SPLIT=per_split, SPLITS=splits,
        # float32 caches: exact dots (TF32 would cost ~1e-2 in the logits); bf16/fp16 are exact either way.
        PRECISION="ieee" if keys.dtype == torch.float32 else "tf32", num_warps=4)
    out = torch.empty((rows, kv_heads, groups, dim), device=q.device, dtype=q.dtype)
    _combine_kernel[(rows, kv_heads * groups)](
        partial, lse, out, SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), DIM=dim, num_warps=4)
    return out


if triton is not None:

    @triton.jit
    def _split_kernel(Q, K_NEW, V_NEW, K, V, TABLE, LENGTHS, WRITE_AT, PARTIAL, LSE,
                      stride_qb, stride_knb, stride_vnb, stride_kh, stride_kt, stride_tb, scale,
                      KV_HEADS: tl.constexpr, GROUPS: tl.constexpr, GROUPS_PAD: tl.constexpr, DIM: tl.constexpr,
                      BLOCK: tl.constexpr, PER_SPLIT: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(LENGTHS + b)  # the new token's position
        offs_g = tl.arange(0, GROUPS_PAD)
        offs_d = tl.arange(0, DIM)
        head = b * KV_HEADS + h
        out_rows = (head * GROUPS + offs_g) * SPLITS + split
        start = split * PER_SPLIT * BLOCK
        if start > length:  # nothing of this row here: weight zero in the merge
            tl.store(LSE + out_rows, tl.full((GROUPS_PAD,), float("-inf"), tl.float32), mask=offs_g < GROUPS)
        else:
            q = tl.load(Q + b * stride_qb + (h * GROUPS + offs_g[:, None]) * DIM + offs_d[None, :],
                        mask=offs_g[:, None] < GROUPS, other=0.0)
            k_new = tl.load(K_NEW + b * stride_knb + h * DIM + offs_d)
            v_new = tl.load(V_NEW + b * stride_vnb + h * DIM + offs_d)
            base = h.to(tl.int64) * stride_kh
            m = tl.full((GROUPS_PAD,), float("-inf"), tl.float32)
            total = tl.zeros((GROUPS_PAD,), tl.float32)
            acc = tl.zeros((GROUPS_PAD, DIM), tl.float32)
            for i in range(PER_SPLIT):
                logical = split * PER_SPLIT + i
                first = logical * BLOCK
                # Blocks past the row's length are not in its table (their loads are masked anyway).
                block = tl.load(TABLE + b * stride_tb + logical, mask=first <= length, other=0).to(tl.int64)
                offs_n = first + tl.arange(0, BLOCK)
                seen = offs_n <= length
                ptrs = base + (block * BLOCK + tl.arange(0, BLOCK))[:, None] * stride_kt + offs_d[None, :]
                k = tl.load(K + ptrs, mask=seen[:, None], other=0.0)
                v = tl.load(V + ptrs, mask=seen[:, None], other=0.0)
                is_new = (offs_n == length)[:, None]
                k = tl.where(is_new, k_new[None, :], k)
                v = tl.where(is_new, v_new[None, :], v)
                scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
                scores = tl.where(seen[None, :], scores, float("-inf"))
                m_new = tl.maximum(m, tl.max(scores, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp(scores - m_safe[:, None])
                alpha = tl.exp(m - m_safe)
                total = total * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
                m = m_new
            tl.store(PARTIAL + out_rows[:, None] * DIM + offs_d[None, :], acc / total[:, None],
                     mask=offs_g[:, None] < GROUPS)
            tl.store(LSE + out_rows, m + tl.log(total), mask=offs_g < GROUPS)
            # The program that holds the new position stores its K/V (nobody else reads that position).
            if (length >= start) & (length < start + PER_SPLIT * BLOCK):
                at = base + tl.load(WRITE_AT + b).to(tl.int64) * stride_kt + offs_d
                tl.store(K + at, k_new)
                tl.store(V + at, v_new)

    @triton.jit
    def _combine_kernel(PARTIAL, LSE, OUT, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, DIM: tl.constexpr):
        row = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)  # (b, kv head, group) flattened
        offs_s = tl.arange(0, SPLITS_PAD)
        offs_d = tl.arange(0, DIM)
        lse = tl.load(LSE + row * SPLITS + offs_s, mask=offs_s < SPLITS, other=float("-inf"))
        used = lse > float("-inf")
        weight = tl.where(used, tl.exp(lse - tl.max(lse, 0)), 0.0)
        part = tl.load(PARTIAL + (row * SPLITS + offs_s[:, None]) * DIM + offs_d[None, :], mask=used[:, None],
                       other=0.0)
        out = tl.sum(part * weight[:, None], 0) / tl.sum(weight, 0)
        tl.store(OUT + row * DIM + offs_d, out.to(OUT.dtype.element_ty))
