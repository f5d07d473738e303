"""A short completion for reports and the demo: ``nanoseek.inference.generate`` (latent cache, MTP speculative
decoding) when it is available, else a minimal sampler that runs a full forward per token (fine for short
samples of small models)."""

from __future__ import annotations

import time
from typing import Any

import torch


def _inference_generate(model):
    try:
        from ..inference import generate
    except ImportError:
        return None
    return generate if hasattr(model, "forward_cached") else None


@torch.no_grad()
def _plain_generate(model, prompt: list[int], max_new_tokens: int, temperature: float, top_k: int | None,
                    seed: int, stop: tuple[int, ...]) -> list[int]:
    device = model.embed_tokens.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt], device=device)
    limit = model.config.max_position_embeddings
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids[:, -limit:])[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = logits.topk(min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        out.append(nxt)
        if nxt in stop:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    return out


def complete(model, tokenizer, prompt: str, max_new_tokens: int = 64, *, bos_id: int | None = None,
             eos_id: int | None = None, temperature: float = 0.6, top_k: int | None = 40, seed: int = 0,
             speculative: bool = True) -> dict[str, Any]:
    """Sample a continuation of ``prompt``: {"prompt", "completion", "tokens", "method", "seconds", ...}."""
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    prompt_ids = ([bos_id] if bos_id is not None else []) + ids
    if not prompt_ids:
        prompt_ids = [eos_id if eos_id is not None else 0]
    room = model.config.max_position_embeddings - len(prompt_ids) - 2
    max_new_tokens = max(0, min(max_new_tokens, room))
    stop = (eos_id,) if eos_id is not None else ()
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    try:
        generate = _inference_generate(model)
        if generate is not None and max_new_tokens > 0:
            spec = speculative and len(model.mtp) > 0
            result = generate(model, [prompt_ids], max_new_tokens, temperature=temperature, top_k=top_k,
                              stop_tokens=stop, seed=seed, speculative=spec)
            new = result.tokens[0]
            stats = result.stats
            info["method"] = "nanoseek.inference.generate" + (" (MTP speculative decoding)" if spec else "")
            if spec and getattr(stats, "acceptance_rate", None) is not None:
                info["acceptance_rate"] = stats.acceptance_rate
            if getattr(stats, "decode_tokens_per_s", None):
                info["decode_tokens_per_s"] = stats.decode_tokens_per_s
        else:
            new = _plain_generate(model, prompt_ids, max_new_tokens, temperature, top_k, seed, stop)
            info["method"] = "full-forward sampler"
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    text_ids = [t for t in new if t not in stop]
    return {"prompt": prompt, "completion": tokenizer.decode(text_ids, skip_special_tokens=True),
            "tokens": len(new), "temperature": temperature, "top_k": top_k, "seed": seed,
            "seconds": round(seconds, 3), **info}
