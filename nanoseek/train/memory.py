"""Whether a training run fits in memory: an estimate of its bytes (weights, gradients, AdamW state, one
micro-batch's activations) against what the device has available, checked before the first step.
"""

from __future__ import annotations

import os

import torch

from ..config import ModelConfig
from ..devices import training_dtype
from ..model import DeepSeekV3
from .config import TrainConfig


def available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_memory(mc: ModelConfig, cfg: TrainConfig) -> dict[str, int]:
    """Bytes for fp32 weights + gradients + AdamW moments, and a (generous) bound on one micro-batch's
    activations: the logits of the main and MTP heads (in the autocast dtype, fp32 for the loss, and their
    gradient) and, per block, the tensors autograd keeps."""
    with torch.device("meta"):
        n_params = sum(p.numel() for p in DeepSeekV3(mc).parameters())
    state = 16 * n_params
    N = cfg.batch_size * cfg.seq_len
    act = 2 if cfg.dtype in ("bf16", "bf16-weights") else 4
    D = mc.num_nextn_predict_layers
    logits = N * mc.vocab_size * (1 + D) * (act + 4 + 4 + 4)
    d = mc.hidden_size
    attn = 3 * mc.num_attention_heads * (mc.qk_head_dim + mc.v_head_dim) + 2 * ((mc.q_lora_rank or 0) + mc.kv_lora_rank)
    ffn_dense = 3 * mc.intermediate_size
    ffn_moe = 3 * (mc.num_experts_per_tok + mc.n_shared_experts) * mc.moe_intermediate_size \
        + mc.num_experts_per_tok * 3 * d + 4 * mc.n_routed_experts
    per_token = 0
    for i in range(mc.num_hidden_layers + D):
        per_token += act * (16 * d + attn + (ffn_moe if mc.is_moe_layer(i) else ffn_dense))
    acts = int(N * per_token * (1.0 if not cfg.activation_checkpointing else 0.3))
    return {"params": n_params, "state": state, "activations": logits + acts, "total": state + logits + acts}


def check_memory(mc: ModelConfig, cfg: TrainConfig, device: torch.device) -> dict[str, int]:
    cfg = cfg.replace(dtype=training_dtype(cfg.dtype, device))  # bf16 trains in fp32 where it is not native
    est = estimate_memory(mc, cfg)
    avail = available_memory(device)
    gib = 2 ** 30
    if avail is not None and est["state"] > avail:
        raise ValueError(f"the model's {est['params'] / 1e9:.2f}B parameters need about {est['state'] / gib:.1f} "
                         f"GiB for their weights, gradients and AdamW state alone, more than the {avail / gib:.1f} "
                         f"GiB available on {device.type}: choose a smaller --preset or --model sizes")
    if avail is not None and est["total"] > avail:
        raise ValueError(
            f"a micro-batch of {cfg.batch_size} x {cfg.seq_len} tokens needs about {est['total'] / gib:.1f} GiB "
            f"({est['state'] / gib:.1f} GiB weights, gradients and AdamW state + {est['activations'] / gib:.1f} GiB "
            f"activations), more than the {avail / gib:.1f} GiB available on {device.type}: lower --batch-size "
            "(and raise --grad-accum to keep the tokens per step) or --seq-len")
    return est
