"""The DeepSeek-V3 model: embedding, a stack of MLA + (dense | MoE) blocks, final norm, output head, and
the MTP modules that share the embedding and the head (SPEC §1-5).

The model is a plain ``nn.Module``: parallelism, training state and caches live outside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import ModelConfig
from .attention import MultiHeadLatentAttention, select_positions
from .embedding import Embedding
from .layers import MLP, Linear, RMSNorm
from .moe import MoE, Routing, RoutedExperts, Router
from .mtp import MTPModule
from .rope import RotaryEmbedding

if TYPE_CHECKING:
    from ..inference.cache import LatentCache, LatentCacheLayer


class Block(nn.Module):
    """Pre-norm transformer block: x + MLA(norm(x)), then x + FFN(norm(x)) with FFN dense or MoE."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = MoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None = None,
                cache: LatentCacheLayer | None = None, input_pos: torch.Tensor | None = None,
                absorb: bool = True, outputs_at: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing | None]:
        """With ``cache``, attention writes this block's latent at ``input_pos`` and reads the cache (see
        :meth:`MultiHeadLatentAttention.forward_cached`); without it, the training path. ``outputs_at`` (B, T'):
        with a cache, only these positions go on past the cache write (attention queries, FFN): (B, T', d)."""
        if cache is None:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask)
        else:
            h = self.input_layernorm(x)
            attn = self.self_attn.forward_cached(h, cos, sin, cache, input_pos, attn_mask, absorb, outputs_at)
            if outputs_at is not None:
                x = select_positions(x, outputs_at)  # (B, T', d): the residual of the positions that go on
            x = x + attn
        if self.is_moe:
            ffn, routing = self.mlp(self.post_attention_layernorm(x))
        else:
            ffn, routing = self.mlp(self.post_attention_layernorm(x)), None
        return x + ffn, routing


@dataclass
class ModelOutput:
    """A training forward's results.

    logits: main-head logits (B, T, V). mtp_logits[k-1]: depth-k logits (B, T-k, V); position i predicts
    t_{i+k+1}. routing: one :class:`Routing` per MoE layer of the main model, then per MTP module.
    hidden: final hidden state after the final norm (B, T, d).
    """

    logits: torch.Tensor
    hidden: torch.Tensor
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    routing: list[Routing] = field(default_factory=list)

    @property
    def expert_counts(self) -> torch.Tensor:
        """(n_moe_layers, E) tokens routed to each expert in this forward."""
        return torch.stack([r.counts for r in self.routing]) if self.routing else torch.zeros(0, 0)


class DeepSeekV3(nn.Module):
    """DeepSeek-V3 / R1 (and V2) language model with D multi-token-prediction modules."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # mtp[k - 1] is depth k = 1..D; checkpoint: model.layers.{num_hidden_layers + k - 1}.* (SPEC §5)
        self.mtp = nn.ModuleList(
            MTPModule(config, config.num_hidden_layers + k) for k in range(config.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(config)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for every matrix (V3 uses std 0.006, SPEC §6), ones for norms, zero biases."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, RoutedExperts):
                module.gate_up_proj.normal_(0.0, std, generator=generator)
                module.down_proj.normal_(0.0, std, generator=generator)
            elif isinstance(module, Router):
                module.weight.normal_(0.0, std, generator=generator)
                if module.e_score_correction_bias is not None:
                    module.e_score_correction_bias.zero_()
        self.rotary.inv_freq.copy_(RotaryEmbedding(self.config).inv_freq)

    # ------------------------------------------------------------------ forward
    def _rope(self, T: int, device: torch.device, positions: torch.Tensor | None):
        if positions is None:
            positions = torch.arange(T, device=device)[None]  # (1, T)
        return self.rotary(positions)  # (B or 1, T, d_R/2) each

    def backbone(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                 attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Routing], tuple]:
        """Run the main layers; return the final normed hidden state (B, T, d), routing, and (cos, sin)."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32) or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be integer token ids of shape (batch, length), both at least 1, got "
                             f"{input_ids.dtype} of shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if not torch.compiler.is_compiling():  # (an out-of-range id fails in the embedding as 'index out of range
            lo, hi = torch.aminmax(input_ids)   # in self' on the CPU, as a device-side assert on a GPU)
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids must be in [0, vocab_size={self.config.vocab_size}), got ids from "
                                 f"{int(lo)} to {int(hi)}")
        if positions is not None and (positions.dim() not in (1, 2) or positions.shape[-1] != T
                                      or positions.dim() == 2 and positions.shape[0] not in (1, B)):
            raise ValueError(f"positions must be of shape (B, T), (1, T) or (T,) for input_ids of shape (B, T) = "
                             f"{(B, T)}, got {tuple(positions.shape)}")
        if attn_mask is not None and attn_mask.dtype != torch.bool:  # SDPA would add a float mask to the scores
            raise ValueError(f"attn_mask must be a bool tensor (True = attend), got {attn_mask.dtype}")
        cos, sin = self._rope(T, input_ids.device, positions)
        x = self.embed_tokens(input_ids)
        routing: list[Routing] = []
        for layer in self.layers:
            x, r = layer(x, cos, sin, attn_mask)
            if r is not None:
                routing.append(r)
        return self.norm(x), routing, (cos, sin)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Main-head logits (B, T, V) for token ids (B, T) (int64 or int32, in [0, vocab_size)); ``positions``
        (B, T), (1, T) or (T,) default 0..T-1;
        ``attn_mask`` bool (True = attend), broadcastable to (B, 1, T, T), replaces the causal mask."""
        hidden, _, _ = self.backbone(input_ids, positions, attn_mask)
        return self.lm_head(hidden)

    def forward_train(self, input_ids: torch.Tensor) -> ModelOutput:
        """Main logits plus what the losses need: MTP logits per depth and every router's routing."""
        hidden, routing, (cos, sin) = self.backbone(input_ids)
        out = ModelOutput(logits=self.lm_head(hidden), hidden=hidden, routing=routing)
        T = input_ids.shape[1]
        h = hidden
        for k, module in enumerate(self.mtp, start=1):
            if T - k <= 0:
                break
            # position i combines h^{k-1}_i with Emb(t_{i+k}); keep the T - k positions that have t_{i+k} (SPEC §5)
            emb_next = self.embed_tokens(input_ids[:, k:])  # (B, T-k, d)
            h, r = module(h[:, : T - k], emb_next, cos[..., : T - k, :], sin[..., : T - k, :])
            out.mtp_logits.append(self.lm_head(h))  # P^k = OutHead(h^k) (V3 eq. 23): (B, T-k, V)
            if r is not None:
                out.routing.append(r)
        return out

    # ------------------------------------------------------------------ inference with a latent cache
    @staticmethod
    def cache_mask(input_pos: torch.Tensor, cache: LatentCache) -> torch.Tensor:
        """(B, 1, T, S) bool: query at slot input_pos[b, t] sees cache slots 0..input_pos[b, t]; S = max slot + 1.

        Slot = token index in its sequence = RoPE position, so sequences of different lengths share a batch
        without any padding inside the cache; slots past a query (right padding, rejected drafts) are masked.
        Under torch.compile S is the cache's whole length instead (static shapes: the graph does not depend on
        the slot reached; the masked slots cost a little attention).
        """
        S = cache.slots if torch.compiler.is_compiling() else int(input_pos.max()) + 1
        slots = torch.arange(S, device=input_pos.device)  # (S,)
        return (slots <= input_pos[..., None]).unsqueeze(1)  # (B, 1, T, S)

    def forward_cached(self, input_ids: torch.Tensor, input_pos: torch.Tensor, cache: LatentCache,
                       absorb: bool = True) -> torch.Tensor:
        """Main layers for tokens (B, T) at cache slots / positions ``input_pos`` (B, T).

        Each layer writes its [c_KV ; k^R] at ``input_pos`` and attends to the cache (``absorb``: absorbed
        decode math, else the up-projected prefill math). Returns the final normed hidden state (B, T, d):
        the input of ``lm_head`` and of the first MTP module.
        """
        cos, sin = self.rotary(input_pos)  # (B, T, d_R/2) each
        mask = self.cache_mask(input_pos, cache)
        x = self.embed_tokens(input_ids)
        for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
            x, _ = layer(x, cos, sin, mask, cache=layer_cache, input_pos=input_pos, absorb=absorb)
        return self.norm(x)

    def mtp_forward_cached(self, k: int, h_prev: torch.Tensor, next_ids: torch.Tensor, input_pos: torch.Tensor,
                           cache: LatentCache, absorb: bool = True,
                           outputs_at: torch.Tensor | None = None) -> torch.Tensor:
        """MTP module k (1-based) at positions ``input_pos`` (B, T) with its own cache layer (SPEC §5).

        Position i combines h^{k-1}_i (B, T, d), normed, with Emb(t_{i+k}) (``next_ids``, B x T); returns
        RMSNorm_k(h^k) (B, T, d), whose ``lm_head`` logits predict t_{i+k+1}. ``outputs_at`` (B, T'): every
        position is written to the cache, but only these run the rest of the block; returns (B, T', d).
        """
        cos, sin = self.rotary(input_pos)
        h, _ = self.mtp[k - 1](h_prev, self.embed_tokens(next_ids), cos, sin, self.cache_mask(input_pos, cache),
                               cache=cache.mtp_layers[k - 1], input_pos=input_pos, absorb=absorb,
                               outputs_at=outputs_at)
        return h

    # ------------------------------------------------------------------ sizes
    def num_parameters(self) -> dict[str, int]:
        """Unique parameter counts: total main model, MTP modules, and activated per token."""
        return count_parameters(self)


def count_parameters(model: DeepSeekV3) -> dict[str, int]:
    """total_params (main model, embedding and head included), mtp_params (unique to the MTP modules),
    activated_params (per token: all but the unselected routed experts; embedding included)."""
    cfg = model.config
    main = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("mtp."))
    mtp = sum(p.numel() for name, p in model.named_parameters() if name.startswith("mtp."))
    inactive = 0
    for layer in model.layers:
        if layer.is_moe:
            per_expert = layer.mlp.experts.gate_up_proj[0].numel() + layer.mlp.experts.down_proj[0].numel()
            inactive += per_expert * (cfg.n_routed_experts - cfg.num_experts_per_tok)
    activated = main - inactive
    return {
        "total_params": main,
        "mtp_params": mtp,
        "activated_params": activated,
        "activated_params_without_embedding": activated - model.embed_tokens.weight.numel(),
    }


def kv_cache_elements_per_token(cfg: ModelConfig) -> dict[str, int]:
    """Per-token cache elements (SPEC §1, §3): MLA's latent (d_c + d_h^R) x layers vs an MHA cache of the same
    heads."""
    latent = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers
    mha = 2 * cfg.num_attention_heads * cfg.qk_nope_head_dim * cfg.num_hidden_layers
    full = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers
    return {"kv_cache_elements_per_token": latent, "mha_cache_elements_per_token": mha,
            "transformers_cache_elements_per_token": full}


