"""One decode step of Qwen3-VL's text decoder over a PagedKVCache, for all slots at once.

Written out over the loaded model's own weights (norms, projections, MLP, rotary module, lm_head),
so it computes what ``Qwen3VLTextModel`` computes, with static shapes and no host synchronisation:
the step can be captured in a CUDA graph. It is also written for few kernels per layer (decode is
bound by launches, not FLOPs): q and k are normalised and rotated as one tensor, the attention
reads K/V in place (grouped query heads as query rows, no repeat), the mask is built once a step.

Positions: after a prefill, Qwen3-VL's text positions are ``cache length + rope_delta`` and the
three mrope components (t, h, w) are equal, so the model's rotary module (fed [3, B, 1] equal ids)
gives the plain rotary of that position. Decode tokens are text: DeepStack (visual features added
to the first layers) only concerns image positions, which all sit in the prefill.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from service.decode.attention import decode_attention_triton, triton_available
from service.decode.cache import PagedKVCache, blocks_for
from service.decode.fp8 import BLOCK as FP8_BLOCK, Fp8Linear
from service.decode.gemv import LinearChoice

# The decoder this step reproduces; other architectures keep transformers' own decode.
SUPPORTED_TEXT_MODELS = ("Qwen3VLTextModel",)


def text_model_of(model: Any) -> Any:
    """The text decoder (``Qwen3VLTextModel``) inside a ``Qwen3VLForConditionalGeneration``."""
    inner = getattr(model, "model", model)
    return getattr(inner, "language_model", inner)


def _plain(module: nn.Module) -> bool:
    """A bias-free nn.Linear (not a quantized replacement): its weight can go to any matmul."""
    return type(module) is nn.Linear and module.bias is None


def fuse_linears(linears: list[nn.Module]) -> nn.Module | None:
    """One projection computing all of ``linears`` (their outputs side by side), whose weights
    become views of the fused tensors (same values, same total memory), so one matmul computes
    all of them. Bias-free ``nn.Linear`` modules, or :class:`Fp8Linear` modules whose scale blocks
    line up (every part but the last a whole number of 128-row blocks: true of the real Qwen3-VL
    shapes, not of the tiny test model's q/k/v). None, and nothing changed, otherwise."""
    if all(_plain(m) for m in linears):
        fused = nn.Linear(linears[0].in_features, sum(m.out_features for m in linears), bias=False, device="meta")
        fused.weight = nn.Parameter(_fuse_rows(linears, "weight"), requires_grad=False)
        return fused
    if (all(isinstance(m, Fp8Linear) and m.gemm is linears[0].gemm for m in linears)
            and all(m.out_features % FP8_BLOCK == 0 for m in linears[:-1])):
        return Fp8Linear.from_tensors(_fuse_rows(linears, "weight"), _fuse_rows(linears, "weight_scale_inv"),
                                      linears[0].gemm)
    return None


def _fuse_rows(modules: list[nn.Module], name: str) -> torch.Tensor:
    """The modules' parameters ``name`` concatenated by rows; each module's becomes a view of it."""
    tensors = [getattr(m, name).detach() for m in modules]
    rows, cols = sum(t.shape[0] for t in tensors), tensors[0].shape[1]
    # Already views of one tensor (fused by an earlier decoder)? Then use it as is. Adjacent but
    # separate allocations (the caching allocator places them so) must not pass: same storage only.
    storage = tensors[0].untyped_storage().data_ptr()
    expected = tensors[0].data_ptr()
    for t in tensors:
        if t.untyped_storage().data_ptr() != storage or t.data_ptr() != expected or not t.is_contiguous():
            break
        expected += t.numel() * t.element_size()
    else:
        return tensors[0].as_strided((rows, cols), (cols, 1))
    fused = torch.cat(tensors)
    offset = 0
    for module, t in zip(modules, tensors):
        getattr(module, name).data = fused[offset:offset + t.shape[0]]  # the old storage is freed here
        offset += t.shape[0]
    return fused


# The elementwise chains of a layer, as functions so that torch.compile can fuse each into one kernel.

def add_rms_norm(hidden: torch.Tensor, update: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream after adding ``update``, and its RMS norm (the next block's input)."""
    hidden = hidden + update
    return hidden, F.rms_norm(hidden, hidden.shape[-1:], weight, eps)


def qk_norm_rotary(qk: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """q_norm / k_norm (normalise, cast, then scale, as transformers rounds them) and the rotary
    embedding of q and k heads side by side ``[B, heads, D]``. ``rotate_half(x) * sin`` is
    ``roll(x, D/2) * signed_sin`` (sin with its first half negated)."""
    qk = F.rms_norm(qk, qk.shape[-1:], eps=eps) * weight
    return torch.addcmul(qk * cos, torch.roll(qk, qk.shape[-1] // 2, dims=-1), signed_sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class Qwen3VLDecoder:
    """Decode steps of a loaded Qwen3-VL model over the slots of a :class:`PagedKVCache`.

    ``fuse_projections`` concatenates each layer's q/k/v and gate/up weights (in place, no extra
    memory once done; :func:`fuse_linears`) so a layer runs 4 matmuls instead of 7; transformers'
    forward is unaffected.
    ``compile_backend`` (e.g. ``"inductor"``, CUDA) compiles the elementwise chains above with
    torch.compile, one fused kernel each; compilation happens at the first steps (the warm-up).
    ``attention``: ``"triton"`` (split-KV kernels of ``service.decode.attention``, CUDA), ``"sdpa"``
    (index writes + ``scaled_dot_product_attention``), or ``"auto"``: triton on CUDA when installed.
    """

    def __init__(self, model: Any, cache: PagedKVCache, *, fuse_projections: bool = False,
                 compile_backend: str | None = None, attention: str = "auto",
                 linear: LinearChoice | None = None) -> None:
        if not self.supports(model):
            raise ValueError(f"{type(model).__name__} is not a Qwen3-VL (dense) model")
        text = text_model_of(model)
        config = text.config
        if config.hidden_act != "silu":
            raise ValueError(f"the MLP activation {config.hidden_act!r} is not SiLU")
        self.cache = cache
        self.embed_tokens = text.embed_tokens
        self.layers = list(text.layers)
        self.norm = text.norm
        self.rotary_emb = text.rotary_emb
        self.lm_head = model.get_output_embeddings()
        self.head_dim = self.layers[0].self_attn.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.layers[0].self_attn.scaling
        self.vocab_size = self.lm_head.weight.shape[0]
        if len(self.layers) != cache.num_layers or self.num_kv_heads != cache.num_kv_heads \
                or self.head_dim != cache.head_dim:
            raise ValueError("the cache was sized for another model")
        # Per layer: the q_norm weight over q's heads and the k_norm weight over k's, as one tensor,
        # so q and k are normalised (and rotated) together.
        self.qk_norm_weights = [
            torch.cat([layer.self_attn.q_norm.weight.detach().expand(self.num_heads, -1),
                       layer.self_attn.k_norm.weight.detach().expand(self.num_kv_heads, -1)])
            for layer in self.layers]
        self.qkv_proj: list[nn.Module | None] = [None] * len(self.layers)
        self.gate_up_proj: list[nn.Module | None] = [None] * len(self.layers)
        if fuse_projections:
            for i, layer in enumerate(self.layers):
                attn, mlp = layer.self_attn, layer.mlp
                self.qkv_proj[i] = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
                self.gate_up_proj[i] = fuse_linears([mlp.gate_proj, mlp.up_proj])
        self.fused = any(p is not None for p in self.qkv_proj + self.gate_up_proj)
        # The step's plain projections: cuBLAS, or a skinny-GEMM kernel where the device measured it
        # faster (measure_projections, before graphs are captured); FP8 ones run their own GEMM.
        self.linear = linear or LinearChoice()
        self._add_rms_norm, self._qk_norm_rotary, self._silu_mul = add_rms_norm, qk_norm_rotary, silu_mul
        if compile_backend:
            compiled = [torch.compile(f, backend=compile_backend, fullgraph=True)
                        for f in (add_rms_norm, qk_norm_rotary, silu_mul)]
            self._add_rms_norm, self._qk_norm_rotary, self._silu_mul = compiled
        if attention == "auto":
            attention = "triton" if cache.device.type == "cuda" and triton_available() else "sdpa"
        if attention not in ("sdpa", "triton") or (attention == "triton" and not triton_available()):
            raise ValueError(f"attention {attention!r}: 'sdpa', or 'triton' where Triton is installed")
        self.attention = attention
        # What a decoder over another cache needs to compute exactly this one's steps (bf16 rounding
        # differs between fused and separate matmuls, compiled and eager elementwise kernels).
        self.options = {"fuse_projections": fuse_projections, "compile_backend": compile_backend,
                        "attention": attention, "linear": self.linear}
        # Index constants (made once: nothing inside the step is built from host data).
        self._arange = torch.arange(max(cache.max_blocks * cache.block_size, cache.block_size), device=cache.device)

    @staticmethod
    def supports(model: Any) -> bool:
        text = text_model_of(model)
        return type(text).__name__ in SUPPORTED_TEXT_MODELS and callable(getattr(model, "get_output_embeddings", None))

    def _qk_v(self, index: int, layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k heads side by side ``[B, H + Hkv, D]``, and v ``[B, Hkv, D]``."""
        rows, attn = hidden.shape[0], layer.self_attn
        qk_heads = self.num_heads + self.num_kv_heads
        if self.qkv_proj[index] is not None:
            qkv = self._project(self.qkv_proj[index], hidden)
            qk, v = qkv[:, :qk_heads * self.head_dim], qkv[:, qk_heads * self.head_dim:]
        else:
            qk, v = torch.cat([attn.q_proj(hidden), attn.k_proj(hidden)], dim=-1), attn.v_proj(hidden)
        return qk.reshape(rows, qk_heads, self.head_dim), v.reshape(rows, self.num_kv_heads, self.head_dim)

    def _mlp(self, index: int, layer: nn.Module, hidden: torch.Tensor, activation=None) -> torch.Tensor:
        """activation: silu(gate) * up; default the step's (compiled for its small shapes on CUDA)."""
        mlp = layer.mlp
        activation = activation or self._silu_mul
        if self.gate_up_proj[index] is None:
            return mlp.down_proj(activation(mlp.gate_proj(hidden), mlp.up_proj(hidden)))
        gate_up = self._project(self.gate_up_proj[index], hidden)
        if _plain(mlp.down_proj):
            return self.linear(gate_up, mlp.down_proj.weight, activation=activation)
        return mlp.down_proj(activation(*gate_up.chunk(2, dim=-1)))

    def _o_proj(self, layer: nn.Module, out: torch.Tensor) -> torch.Tensor:
        return self._project(layer.self_attn.o_proj, out)

    def _project(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A plain linear through the measured choice of matmul; others (FP8) as they are."""
        return self.linear(x, module.weight) if _plain(module) else module(x)

    def measure_projections(self, batch_sizes) -> None:
        """Time cuBLAS and the skinny kernel for the step's plain projection shapes (one layer's: all
        layers share them) at each decode batch size; keep the faster per shape (CUDA only)."""
        index, layer = 0, self.layers[0]
        weights = [(p.weight, False) for p in (self.qkv_proj[index], self.gate_up_proj[index])
                   if p is not None and _plain(p)]
        weights += [(m.weight, silu) for m, silu in ((layer.self_attn.o_proj, False), (layer.mlp.down_proj, True))
                    if _plain(m)]
        self.linear.measure(weights, list(batch_sizes), self._silu_mul)
        fp8 = [m for m in (self.qkv_proj[index], self.gate_up_proj[index], layer.self_attn.o_proj, layer.mlp.down_proj)
               if isinstance(m, Fp8Linear) and hasattr(m.gemm, "measure")]
        if fp8 and fp8[0].weight.device.type == "cuda":
            fp8[0].gemm.measure([(m.weight, m.weight_scale_inv) for m in fp8], list(batch_sizes), self.cache.dtype)

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, positions: torch.Tensor, active: torch.Tensor,
             context_len: int | None = None) -> torch.Tensor:
        """Logits (float32, ``[B, vocab]``) of the next token for slots ``0..B-1``.

        ``input_ids``, ``positions`` (rotary positions) and ``active`` (bool) are device tensors of
        ``B <= num_slots`` rows; row i is slot i. For an active row, the token's K/V are written at
        position ``lengths_dev[i]`` of its slot (through its block table), it attends to
        ``0..lengths_dev[i]``, and ``lengths_dev[i]`` advances by one. Inactive rows compute garbage
        that is ignored, write to the scratch block and keep their length. ``context_len`` (default:
        the longest sequence) bounds the keys read; it must exceed every active row's length.
        Static shapes, no host sync.
        """
        cache = self.cache
        rows, heads, kv_heads, dim = input_ids.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        context_len = cache.max_len if context_len is None else context_len
        lengths = cache.lengths_dev[:rows]
        table = cache.block_table[:rows]
        size = cache.block_size
        column = (lengths // size).clamp(max=cache.max_blocks - 1)[:, None]
        physical = table.gather(1, column)[:, 0].long() * size + lengths % size
        write_at = torch.where(active, physical, cache.scratch_block * size)  # inactive rows: scratch
        if self.attention == "sdpa":
            # Each row's keys gathered from its blocks, [Hkv, B, Lb, D] views of the pools; each row
            # attends to its own prefix and this step's token: an additive mask [B, 1, 1, Lb].
            blocks = blocks_for(context_len, size)
            gather = (table[:, :blocks].long()[:, :, None] * size + self._arange[:size]).reshape(-1)
            span = blocks * size
            attend = self._arange[:span][None, :] <= lengths[:, None]
            mask = torch.where(attend, 0.0, float("-inf")).to(self.embed_tokens.weight.dtype)[:, None, None, :]
        hidden = self.embed_tokens(input_ids)  # [B, hidden]: the residual stream
        cos, sin = self.rotary_emb(hidden, positions.view(1, rows, 1).expand(3, rows, 1))  # t = h = w; [B, 1, D]
        signed_sin = torch.cat([-sin[..., :dim // 2], sin[..., dim // 2:]], dim=-1)
        first = self.layers[0].input_layernorm
        normed = F.rms_norm(hidden, hidden.shape[-1:], first.weight, first.variance_epsilon)
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            qk, value = self._qk_v(index, layer, normed)
            qk = self._qk_norm_rotary(qk, self.qk_norm_weights[index], cos, signed_sin, attn.q_norm.variance_epsilon)
            keys, values = cache.keys[index], cache.values[index]
            # GQA without copying K/V: the query heads of one KV head act as query rows of one
            # position (head h uses kv head h // groups, as transformers' repeat_kv).
            query = qk[:, :heads].reshape(rows, kv_heads, heads // kv_heads, dim)
            if self.attention == "triton":
                out = decode_attention_triton(query, qk[:, heads:], value, keys, values, table, lengths, write_at,
                                              context_len, self.scaling, block_size=size)
            else:
                keys[:, write_at] = qk[:, heads:].transpose(0, 1)
                values[:, write_at] = value.transpose(0, 1)
                row_keys = keys[:, gather].view(kv_heads, rows, span, dim).transpose(0, 1)
                row_values = values[:, gather].view(kv_heads, rows, span, dim).transpose(0, 1)
                out = F.scaled_dot_product_attention(query, row_keys, row_values, attn_mask=mask, scale=self.scaling)
            post = layer.post_attention_layernorm
            hidden, normed = self._add_rms_norm(hidden, self._o_proj(layer, out.reshape(rows, heads * dim)),
                                                post.weight, post.variance_epsilon)
            following = self.layers[index + 1].input_layernorm if index + 1 < len(self.layers) else self.norm
            hidden, normed = self._add_rms_norm(hidden, self._mlp(index, layer, normed), following.weight,
                                                following.variance_epsilon)
        cache.lengths_dev[:rows] += active.to(cache.lengths_dev.dtype)
        return self.lm_head(normed).float()
