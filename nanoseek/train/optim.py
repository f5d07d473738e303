"""AdamW with DeepSeek-V3's settings and the schedules of SPEC §6 (learning rate) and §4-§5 (bias speed
gamma, MTP weight lambda).

- Parameter groups: weight decay on matrices (attention and FFN projections, experts, router centroids,
  output head); none on norms, biases and the embedding unless configured.
- Learning rate: linear warmup 0 -> lr, constant, cosine decay to lr * min_lr_ratio (by default at the last
  step), held, and optionally a last constant tail at lr * final_lr_ratio (V3: warmup over 2K steps to 2.2e-4,
  constant to 10T tokens, cosine to 2.2e-5 at 14.3T, 2.2e-5 for 333B tokens, then 7.3e-6 for the last 167B).
- lambda and gamma: a value, then a later value from a switch point on (V3: lambda 0.3 for the first 10T
  tokens then 0.1; gamma 0.001 for the first 14.3T tokens then 0).
- Batch size: optionally warmed up, from a smaller number of sequences per step to the full batch over the
  first tokens (V3: 3072 -> 15360 sequences over the first 469B tokens).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn


def parameter_groups(model: nn.Module | Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                     decay_embeddings: bool = False, decay_norms_and_biases: bool = False) -> list[dict]:
    """Two AdamW groups, each with the names of its parameters (``names``) for checkpoints and reports.
    ``model`` may also be (name, parameter) pairs: a distributed rank's own parameters."""
    decay, no_decay = ([], []), ([], [])
    seen: set[int] = set()
    named = model.named_parameters() if isinstance(model, nn.Module) else model
    for name, p in named:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = name.endswith("embed_tokens.weight")
        is_norm_or_bias = p.dim() < 2
        if (is_embedding and not decay_embeddings) or (is_norm_or_bias and not decay_norms_and_biases):
            no_decay[0].append(p), no_decay[1].append(name)
        else:
            decay[0].append(p), decay[1].append(name)
    groups = [{"params": decay[0], "names": decay[1], "weight_decay": weight_decay},
              {"params": no_decay[0], "names": no_decay[1], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module | Iterable[tuple[str, nn.Parameter]], cfg) -> torch.optim.AdamW:
    groups = parameter_groups(model, cfg.weight_decay, cfg.decay_embeddings, cfg.decay_norms_and_biases)
    # the fused kernel does each parameter's update in one pass: 1.10x (fp32) to 1.18x (bf16 autocast) per
    # training step on the bench preset (benchmarks/nanoseek_variants.py); CPU and CUDA float parameters only
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused)


def learning_rate(step: int, cfg) -> float:
    """LR of optimizer step ``step`` (0-based) of ``cfg.steps``: warmup -> constant -> cosine -> constant tails
    (SPEC §6)."""
    total, warmup = cfg.steps, cfg.warmup_steps
    if warmup and step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.final_start is not None and step >= _steps(cfg.final_start, total):
        return cfg.lr * cfg.final_lr_ratio
    decay_from = max(warmup, math.floor(_steps(cfg.decay_start, total)))
    if step < decay_from:
        return cfg.lr
    decay_last = max(decay_from, math.ceil(_steps(cfg.decay_end, total)) - 1)  # the step the cosine reaches low
    span = max(1, decay_last - decay_from)
    progress = min(1.0, (step - decay_from) / span)
    low = cfg.lr * cfg.min_lr_ratio
    return low + (cfg.lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _steps(fraction: float, total: int) -> float:
    """fraction x total steps, without float noise: 0.68 x 10000 is 6800.000000000001 in binary floating point."""
    return round(fraction * total, 9)


def switched(step: int, total: int, first: float, later: float, switch: float) -> float:
    """``first`` before step switch * total, ``later`` from there on."""
    return first if step < _steps(switch, total) else later


def mtp_lambda(step: int, cfg) -> float:
    return switched(step, cfg.steps, cfg.mtp_lambda, cfg.mtp_lambda_later, cfg.mtp_lambda_switch)


def bias_gamma(step: int, cfg) -> float:
    if cfg.balance != "bias":
        return 0.0
    return switched(step, cfg.steps, cfg.bias_gamma, cfg.bias_gamma_later, cfg.bias_gamma_switch)


def micro_batches(tokens: int, cfg) -> int:
    """Micro-batches in the optimizer step that starts after ``tokens`` trained tokens: ``grad_accum``, or during
    the batch-size warmup (SPEC §6) the sequences per step grown linearly in tokens from ``batch_warmup_start``
    to batch_size x grad_accum, in whole micro-batches (rounded down)."""
    if cfg.batch_warmup_start is None or tokens >= cfg.batch_warmup_tokens:
        return cfg.grad_accum
    full = cfg.batch_size * cfg.grad_accum
    sequences = cfg.batch_warmup_start + (full - cfg.batch_warmup_start) * tokens // cfg.batch_warmup_tokens
    return sequences // cfg.batch_size
