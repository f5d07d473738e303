"""Multi-head latent attention (MLA), SPEC §3 / DeepSeek-V2 §2.1, eqs. (37)-(47) of the V2 paper.

Queries are compressed to c_Q (optional), keys and values jointly to the latent c_KV; a decoupled key
k^R carries RoPE and is shared by all heads. This module is the training / prefill path, which
up-projects c_KV to per-head keys and values; decoding over the latent lives with the cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm
from .rope import apply_rope

# The latent norms (q_a_layernorm, kv_a_layernorm) use a fixed eps in both references: DeepSeek's
# inference code builds RMSNorm(q_lora_rank) / RMSNorm(kv_lora_rank) with the default 1e-6, and
# transformers' DeepseekV3Attention / DeepseekV2Attention do the same, ignoring config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6


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
        d, h = config.hidden_size, config.num_attention_heads
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, self.q_lora_rank, bias=False)  # W_DQ
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, h * self.qk_head_dim, bias=False)  # [W_UQ; W_QR]
        self.kv_a_proj_with_mqa = nn.Linear(d, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)  # [W_DKV; W_KR]
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, h * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_head_dim, d, bias=False)  # W_O

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
        k_rope = apply_rope(k_rope.unsqueeze(-2), cos, sin).squeeze(-2)  # one head shared by all
        return self.kv_a_layernorm(c_kv), k_rope

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal self-attention over x: (B, T, d). ``attn_mask`` (bool, True = attend) replaces the causal mask."""
        B, T, _ = x.shape
        q_nope, q_rope = self.queries(x, cos, sin)
        c_kv, k_rope = self.latent(x, cos, sin)
        kv = self.kv_b_proj(c_kv).unflatten(-1, (self.n_heads, -1))  # (B, T, H, d_h + d_v): W_UK, W_UV (eqs. 42, 45)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)  # (B, T, H, d_h + d_h^R)  eq. 40
        k = torch.cat((k_nope, k_rope.unsqueeze(2).expand(-1, -1, self.n_heads, -1)), dim=-1)  # eq. 44
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H, T, .)
            attn_mask=attn_mask, is_causal=attn_mask is None, scale=self.softmax_scale)  # eq. 46
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.v_head_dim))  # eq. 47
