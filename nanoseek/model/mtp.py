"""Multi-token prediction (SPEC §5; DeepSeek-V3 §2.2, eqs. 21-23).

Module k combines the previous depth's representation h^{k-1}_i with the embedding of token t_{i+k}:
h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)] (embedding first, as in the released checkpoint),
runs one MoE transformer block, and predicts t_{i+k+1} through the shared output head.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .layers import Linear, RMSNorm
from .moe import Routing


class MTPModule(nn.Module):
    """One MTP depth: enorm, hnorm, eh_proj (M_k), a transformer block (TRM_k) and its output norm."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        from .transformer import Block  # the block is defined with the main model

        d = config.hidden_size
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.eh_proj = Linear(2 * d, d)  # M_k: d x 2d
        self.block = Block(config, layer_idx)  # the checkpoint has no "block." level: hf.hf_name strips it
        self.norm = RMSNorm(d, config.rms_norm_eps)  # checkpoint: shared_head.norm

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None, **cache_args) -> tuple[torch.Tensor, Routing | None]:
        """h_prev: h^{k-1} (B, T, d) after its final norm; emb_next: Emb(t_{i+k}) (B, T, d).

        Returns RMSNorm_k(h^k): the input of the shared output head and of depth k + 1. ``cache_args``
        (cache, input_pos, absorb, outputs_at) run the block against this module's own latent cache layer
        (drafting); ``outputs_at`` picks the positions that run the block past the cache write.
        """
        h = self.eh_proj(torch.cat((self.enorm(emb_next), self.hnorm(h_prev)), dim=-1))  # eq. 21
        h, routing = self.block(h, cos, sin, attn_mask, **cache_args)  # eq. 22
        return self.norm(h), routing
