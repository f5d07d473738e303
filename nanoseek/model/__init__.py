"""The DeepSeek-V3 model, one concern per module: rope, attention (MLA), moe, experts, mtp, transformer."""

from .transformer import Block, DeepSeekV3, ModelOutput, count_parameters, kv_cache_elements_per_token

__all__ = ["Block", "DeepSeekV3", "ModelOutput", "count_parameters", "kv_cache_elements_per_token"]
