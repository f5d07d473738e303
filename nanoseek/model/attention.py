"""Multi-head latent attention (MLA), SPEC §3 / DeepSeek-V2 §2.1, eqs. (37)-(47) of the V2 paper.

Queries are compressed to c_Q (optional), keys and values jointly to the latent c_KV; a decoupled key
k^R carries RoPE and is shared by all heads. ``forward`` is the training path: it up-projects c_KV to
per-head keys and values. ``forward_cached`` runs against a latent cache (nanoseek.inference.cache) that
holds only [c_KV ; k^R] per token: either the same up-projected attention over the cached latent (prefill,
while the prefix is short enough, see EXPANDED_KV_BUDGET) or the absorbed form of SPEC §3 that never leaves
the latent space (decoding, and prefill over a long prefix).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from . import cpu_attention
from .layers import Linear, RMSNorm, compute_dtype, low_precision_cpu
from .rope import apply_rope

if TYPE_CHECKING:
    from ..inference.cache import LatentCacheLayer

# The latent norms (q_a_layernorm, kv_a_layernorm) use a fixed eps in both references: DeepSeek's
# inference code builds RMSNorm(q_lora_rank) / RMSNorm(kv_lora_rank) with the default 1e-6, and
# transformers' DeepseekV3Attention / DeepseekV2Attention do the same, ignoring config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6
# Attention over a cache switches to memory-bounded math past these sizes (elements), so that a chunked prefill
# of any length needs activation memory for one chunk, not for the whole prefix:
EXPANDED_KV_BUDGET = 1 << 28  # per-head keys + values of the prefix (B x S x H x (d_h + d_v)): else absorbed
SCORES_BUDGET = 1 << 26  # absorbed attention's scores (B x H x T x S): else flash attention over the latent
# Causal self-attention in bf16 / fp16 on the CPU without a mask (the full forward: training, validation) runs in
# nanoseek's fused kernel (cpu_attention: bf16 on CPUs with AVX-512 bf16), else as explicit scores up to this many
# (B x H x T x T), see causal_attention_lowp:
LOWP_SCORES_BUDGET = 1 << 25


def causal_attention_lowp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale q k^T + causal mask) v for q, k (B, H, T, d), v (B, H, T, d_v) in bf16 / fp16, as two
    query blocks: the first half attends to the first half of the keys, the second half to all of them, so
    a quarter of the (masked) score matrix is never computed. Each block's scores come from one baddbmm that
    scales and masks in its fp32 accumulator and rounds once; softmax reads them in the low precision.

    PyTorch's fused CPU kernel keeps the scores in fp32 but is slow on short, narrow heads: forward + backward
    of the bench preset's attention (4 x 16 heads x 512 tokens, d = 48, bf16) took 65 ms there against 24 ms
    here. The price is the rounding of the scores to bf16 (as in transformers' eager attention): the mean error
    against fp32 attention was 0.00038 against 0.00021 for the fused kernel (random inputs of that shape).
    """
    B, H, T, _ = q.shape
    q_NTd, k_NTd, v_NTd = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)  # (B*H, T, .)
    masked = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)  # (T, T) above diagonal
    half = T // 2
    blocks = []
    for start, end in ((0, half), (half, T)):
        if end == start:
            continue
        s_NQK = torch.baddbmm(masked[start:end, :end], q_NTd[:, start:end], k_NTd[:, :end].transpose(1, 2),
                              alpha=scale)  # (B*H, end - start, end) = scale q k^T + mask  (V2 eq. 46)
        blocks.append(torch.bmm(s_NQK.softmax(-1), v_NTd[:, :end]))  # (B*H, end - start, d_v)
    return torch.cat(blocks, 1).unflatten(0, (B, H))  # (B, H, T, d_v)


def causal_suffix(mask: torch.Tensor) -> bool:
    """Whether a bool mask (B, 1, T, S) is plain causal attention for queries at the last T of S positions: query
    t sees keys 0 .. S - T + t, in every row (a prefill chunk after a cached prefix, as cache_mask builds it)."""
    T, S = mask.shape[-2:]
    if S < T or mask.dtype != torch.bool:
        return False
    causal = torch.ones(T, S, dtype=torch.bool, device=mask.device).tril(S - T)  # (T, S)
    return torch.equal(mask, causal.expand_as(mask))


def select_positions(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (B, T, C) at positions ``index`` (B, T') of each row: (B, T', C)."""
    return t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))  # index (B, T') -> (B, T', C)


class MultiHeadLatentAttention(nn.Module):
    """MLA with query compression, joint KV compression and the decoupled shared RoPE key."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.softmax_scale = config.softmax_scale
        d, n_h = config.hidden_size, config.num_attention_heads
        if self.q_lora_rank is None:
            self.q_proj = Linear(d, n_h * self.qk_head_dim)
        else:
            self.q_a_proj = Linear(d, self.q_lora_rank)  # W_DQ
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(self.q_lora_rank, n_h * self.qk_head_dim)  # [W_UQ; W_QR]
        self.kv_a_proj_with_mqa = Linear(d, self.kv_lora_rank + self.qk_rope_head_dim)  # [W_DKV; W_KR]
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.kv_lora_rank, n_h * (self.qk_nope_head_dim + self.v_head_dim))
        self.o_proj = Linear(n_h * self.v_head_dim, d)  # W_O

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q^C (B, T, H, d_h) and RoPE'd q^R (B, T, H, d_h^R)  (V2 eqs. 37-39)."""
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # c_Q = W_DQ h, then W_UQ c_Q
        q = q.unflatten(-1, (self.n_heads, self.qk_head_dim))  # (B, T, H, d_h + d_h^R)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin)

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache stores: normalized c_KV (B, T, d_c) and RoPE'd shared k^R (B, T, d_h^R) (V2 eqs. 41, 43)."""
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        # one head shared by all: (B, T, d_R) -> (B, T, 1, d_R) -> (B, T, d_R)
        k_rope = apply_rope(k_rope.unsqueeze(-2), cos, sin).squeeze(-2)
        return self.kv_a_layernorm(c_kv), k_rope

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal self-attention over x: (B, T, d). ``attn_mask`` (bool, True = attend) replaces the causal mask."""
        q_nope, q_rope = self.queries(x, cos, sin)
        c_kv, k_rope = self.latent(x, cos, sin)
        return self._attend_expanded(q_nope, q_rope, c_kv, k_rope, attn_mask)

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCacheLayer,
                       input_pos: torch.Tensor, attn_mask: torch.Tensor, absorb: bool = True,
                       outputs_at: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of x: (B, T, d) at cache slots ``input_pos`` (B, T) over the cached latent.

        The new tokens' [c_KV ; k^R] are written at ``input_pos`` first (explicit positions: nothing advances
        implicitly, and a slot left by a rejected draft is simply overwritten later); then the queries attend
        to cache slots 0..S-1 with ``attn_mask`` (B, 1, T, S), True = attend. ``absorb`` picks the absorbed
        decode math (cheap for few queries) or the up-projected prefill math (cheap for many); both are exact.
        ``outputs_at`` (B, T') indexes the positions whose output is wanted (default all T): every position
        is still written to the cache, but only those form queries. Returns (B, T or T', d).
        """
        kv = cache.update(input_pos, *self.latent(x, cos, sin), length=attn_mask.shape[-1])  # (B, S, d_c + d_R)
        if outputs_at is not None:
            x, cos, sin = (select_positions(t, outputs_at) for t in (x, cos, sin))
            wanted = outputs_at[:, None, :, None].expand(-1, 1, -1, attn_mask.shape[-1])  # (B, T') -> (B, 1, T', S)
            attn_mask = attn_mask.gather(2, wanted)  # the wanted queries' mask rows: (B, 1, T', S)
        q_nope, q_rope = self.queries(x, cos, sin)
        B, S = kv.shape[:2]
        if B * S * self.n_heads * (self.qk_nope_head_dim + self.v_head_dim) > EXPANDED_KV_BUDGET:
            absorb = True  # a long cached prefix: per-head keys and values would outgrow the latent cache itself
        if not absorb:
            c_kv, k_rope = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
            return self._attend_expanded(q_nope, q_rope, c_kv, k_rope, attn_mask)
        return self._attend_absorbed(q_nope, q_rope, kv, attn_mask)

    def _attend_expanded(self, q_nope: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor,
                         attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Up-project the latent to per-head k^C, v and run standard attention; causal when no mask is given."""
        B, T = q_nope.shape[:2]
        kv_up = self.kv_b_proj(c_kv).unflatten(-1, (self.n_heads, -1))  # (B, S, H, d_h + d_v): W_UK, W_UV (eqs. 42, 45)
        k_nope, v = kv_up.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)  # (B, T, H, d_h + d_h^R)  eq. 40
        k_rope_heads = k_rope.unsqueeze(2).expand(-1, -1, self.n_heads, -1)  # k^R (B, S, d_R) -> (B, S, H, d_R)
        k = torch.cat((k_nope, k_rope_heads), dim=-1)  # (B, S, H, d_h + d_h^R)  eq. 44
        if self._fused_cpu_attention(q, attn_mask):
            with torch.autocast("cpu", enabled=False):  # fused CPU kernel: scores never leave the cache
                o = cpu_attention.causal_attention(q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16),
                                                   self.softmax_scale)  # (B, T, H, d_v)
            return self.o_proj(o.reshape(B, T, self.n_heads * self.v_head_dim))  # (B, T, H*d_v), eq. 47
        if attn_mask is None and low_precision_cpu(q) and B * self.n_heads * T * T <= LOWP_SCORES_BUDGET:
            dtype = compute_dtype(q)
            with torch.autocast("cpu", enabled=False):
                o = causal_attention_lowp(q.transpose(1, 2).to(dtype), k.transpose(1, 2).to(dtype),
                                          v.transpose(1, 2).to(dtype), self.softmax_scale)  # (B, H, T, d_v)
            o = o.transpose(1, 2).reshape(B, T, self.n_heads * self.v_head_dim)  # (B, H, T, d_v) -> (B, T, H*d_v)
            return self.o_proj(o)  # eq. 47
        pad = self.qk_head_dim - self.v_head_dim
        if pad > 0 and q.device.type == "cpu":
            # PyTorch's fused (flash) CPU kernel needs equal key and value widths, else SDPA falls back to its
            # math path (2x slower in bf16 here; with a cache mask, as in a chunked prefill, it also runs
            # where / isneginf / all passes over the scores): pad v with zeros and drop those columns again
            v = F.pad(v, (0, pad))  # (B, S, H, d_h + d_h^R)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H, T or S, .)
            attn_mask=attn_mask, is_causal=attn_mask is None, scale=self.softmax_scale)  # eq. 46
        o = o[..., : self.v_head_dim]  # (B, H, T, d_v)
        o = o.transpose(1, 2).reshape(B, T, self.n_heads * self.v_head_dim)  # (B, H, T, d_v) -> (B, T, H*d_v)
        return self.o_proj(o)  # eq. 47

    def _fused_cpu_attention(self, q: torch.Tensor, attn_mask: torch.Tensor | None) -> bool:
        """Whether attention runs in nanoseek's fused bf16 CPU kernel (cpu_attention): causal self-attention
        (training, validation), or a prefill chunk over the cache whose mask is plain causal (inference only: the
        kernel's backward is self-attention's; eager only: the mask is checked, and compiled graphs keep one path)."""
        if not (compute_dtype(q) == torch.bfloat16 and low_precision_cpu(q)
                and cpu_attention.shapes_supported(self.qk_head_dim, self.v_head_dim) and cpu_attention.available()):
            return False
        if attn_mask is None:
            return True
        return not torch.is_grad_enabled() and not torch.compiler.is_compiling() and causal_suffix(attn_mask)

    def _attend_absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor,
                         attn_mask: torch.Tensor) -> torch.Tensor:
        """Absorbed attention over the cached latent kv = [c_KV ; k^R] (B, S, d_c + d_R)  (SPEC §3).

        q^C . k^C_j = q^C . (W_UK c_KV_j) = (W_UK^T q^C) . c_KV_j, so W_UK folds into the query; the RoPE part
        q^R . k^R_j is added as is (RoPE sits between the matrices, so it cannot be absorbed). The values are
        never formed: o = W_UV (sum_j p_j c_KV_j), i.e. W_UV is applied after attention over the latent.
        """
        B, T, H = q_nope.shape[:3]
        # (H, d_h + d_v, d_c): each head's [W_UK; W_UV] rows
        w = self.kv_b_proj.weight.view(H, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)  # (H, d_h, d_c), (H, d_v, d_c)
        # The per-head products are bmm over views of kv_b_proj's weight. BLAS reads the fp32 views in place, but
        # oneDNN (bf16 / fp16 on the CPU) copies them on every call: 2.4 ms per layer of DeepSeek-V2-Lite in bf16,
        # more than the rest of its attention. Each head's whole [W_UK; W_UV] block (d_h + d_v rows) is
        # contiguous, so there the products run over whole blocks: the query padded with zeros for the W_UV
        # rows, and the output of the W_UV rows kept (twice the multiply-adds, no copy; not when compiling,
        # where Inductor turns these few-row products into fused reductions over the views).
        whole_blocks = low_precision_cpu(q_nope) and not torch.compiler.is_compiling()
        q_HMd = q_nope.reshape(B * T, H, -1).transpose(0, 1)  # (H, B*T, d_h)
        if whole_blocks:
            q_latent = torch.bmm(F.pad(q_HMd, (0, self.v_head_dim)), w)  # W_UK^T q^C: (H, B*T, d_c)
        else:
            q_latent = torch.bmm(q_HMd, w_uk)  # W_UK^T q^C: (H, B*T, d_c)
        q_latent = q_latent.transpose(0, 1).reshape(B, T, H, -1)  # (B, T, H, d_c)
        q = torch.cat((q_latent, q_rope), dim=-1)  # (B, T, H, d_c + d_R), matches the cached [c_KV ; k^R]
        S = kv.shape[1]
        if B * H * T * S > SCORES_BUDGET:  # a long prefill chunk: never form the (B, H, T, S) scores
            # flash attention in MQA form: one latent "head" [c_KV ; k^R] is the key of every query head and
            # also its value, whose k^R columns are dropped after: sum_j p_j [c_KV_j ; k^R_j] -> sum_j p_j c_KV_j
            k = kv.unsqueeze(1)  # (B, 1, S, d_c + d_R)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k, k, attn_mask=attn_mask, enable_gqa=True,
                                               scale=self.softmax_scale)  # (B, H, T, d_c + d_R)
            o_latent = o[..., : self.kv_lora_rank].transpose(1, 2)  # (B, T, H, d_c)
        else:
            # rows (t, h) of one (T*H, S) product per sequence: the scores come out with S contiguous for the mask
            # and the softmax (an einsum over (b, h, t, s) left them strided). With these products this attention
            # ran faster than with einsums in 35 of 36 cases measured (demo, bench and V2-Lite shapes, 1 and 2
            # tokens, contexts 64-4096): up to 1.6x in fp32, 1.1-2.1x in bf16 (benchmarks/results/decode.md)
            scores = torch.bmm(q.view(B, T * H, -1), kv.transpose(1, 2)).float()  # q^C.k^C + q^R.k^R: (B, T*H, S)
            scores = scores.view(B, T, H, S) * self.softmax_scale  # (eq. 46)
            keep = attn_mask.transpose(1, 2)  # (B, T, 1, S)
            probs = scores.masked_fill(~keep, float("-inf")).softmax(dim=-1).to(kv.dtype)  # (B, T, H, S)
            # sum_j p_j c_KV_j: (B, T*H, S) @ (B, S, d_c) -> (B, T*H, d_c)
            o_latent = torch.bmm(probs.view(B, T * H, S), kv[..., : self.kv_lora_rank])
            o_latent = o_latent.view(B, T, H, -1)  # (B, T, H, d_c)
        o_HMc = o_latent.reshape(B * T, H, -1).transpose(0, 1)  # (H, B*T, d_c)
        if whole_blocks:
            o = torch.bmm(w, o_HMc.transpose(1, 2))[:, self.qk_nope_head_dim:].transpose(1, 2)  # (H, B*T, d_v)
        else:
            o = torch.bmm(o_HMc, w_uv.transpose(1, 2))  # W_UV after attention: (H, B*T, d_v)
        o = o.transpose(0, 1).reshape(B, T, H * self.v_head_dim)  # (H, B*T, d_v) -> (B, T, H*d_v)
        return self.o_proj(o)  # eq. 47
