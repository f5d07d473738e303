"""The latent KV cache of MLA (SPEC §3): per layer, only the normalized c_KV and the RoPE'd shared key k^R.

Each layer holds one buffer [c_KV ; k^R] of shape (B, S, d_c + d_R) in the model dtype: (kv_lora_rank +
qk_rope_head_dim) elements per token per layer, no per-head keys or values. S is sized to the request
(longest prompt + max new tokens, plus the draft slots of speculative decoding), never to the model's maximum
context. Writes go to explicit slots (``input_pos``; slot = token index in its sequence = RoPE position),
as in gpt-fast: nothing advances implicitly, so sequences of different lengths share a batch, and the slots
written by rejected speculative tokens need no rollback - the mask hides them until they are overwritten.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


class LatentCacheLayer:
    """One attention layer's cache: kv (B, S, d_c + d_R), rows [c_KV ; k^R] per slot."""

    def __init__(self, kv: torch.Tensor):
        self.kv = kv

    def update(self, input_pos: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor, length: int) -> torch.Tensor:
        """Write c_KV (B, T, d_c) and k^R (B, T, d_R) at slots ``input_pos`` (B, T); return slots [0, length)."""
        B, S = self.kv.shape[:2]
        if length > S:  # the caller attends to slots 0..max(input_pos), so this bounds every write too
            raise ValueError(f"cache slot {length - 1} is past the cache's {S} slots")
        rows = torch.arange(B, device=input_pos.device)[:, None]  # (B, 1) broadcast against (B, T)
        self.kv[rows, input_pos] = torch.cat((c_kv, k_rope), dim=-1).to(self.kv.dtype)
        return self.kv[:, :length]  # (B, length, d_c + d_R)


class LatentCache:
    """Latent cache for every main layer (``layers``) and, for drafting, every MTP module (``mtp_layers``).

    Args:
        config: the model's configuration (d_c, d_R, number of layers).
        batch_size: sequences in the request.
        max_length: slots per sequence (the longest sequence the request can reach).
        mtp: also allocate one layer per MTP module (speculative decoding).
        dtype / device: the model's.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int, *, mtp: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        width = config.kv_lora_rank + config.qk_rope_head_dim  # (d_c + d_R) per token per layer

        def layer() -> LatentCacheLayer:
            return LatentCacheLayer(torch.zeros(batch_size, max_length, width, dtype=dtype, device=device))

        self.layers = [layer() for _ in range(config.num_hidden_layers)]
        self.mtp_layers = [layer() for _ in range(config.num_nextn_predict_layers if mtp else 0)]
        self.batch_size, self.max_length = batch_size, max_length

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_length: int, mtp: bool = False) -> "LatentCache":
        """A cache in the model's dtype and on its device."""
        weight = model.embed_tokens.weight
        return cls(model.config, batch_size, max_length, mtp=mtp, dtype=weight.dtype, device=weight.device)

    @property
    def slots(self) -> int:
        """Slots per sequence, read off a buffer's shape (under torch.compile a size, not a constant that
        would compile the graph again for every request length)."""
        return self.layers[0].kv.shape[1] if self.layers else self.mtp_layers[0].kv.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers, the MTP layers included."""
        return sum(layer.kv.nbytes for layer in self.layers + self.mtp_layers)

    @property
    def main_nbytes(self) -> int:
        """Bytes held by the main model's layers: B x S x (d_c + d_R) x layers x dtype bytes."""
        return sum(layer.kv.nbytes for layer in self.layers)
