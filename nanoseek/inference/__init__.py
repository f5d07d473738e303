"""Inference: the latent KV cache, sampling, ``generate`` and MTP speculative decoding."""

from .cache import LatentCache, LatentCacheLayer
from .generate import GenerationResult, GenerationStats, generate
from .sampling import logits_to_probs, sample
from .speculative import MTPSpeculator, speculative_accept

__all__ = ["GenerationResult", "GenerationStats", "LatentCache", "LatentCacheLayer", "MTPSpeculator",
           "generate", "logits_to_probs", "sample", "speculative_accept"]
