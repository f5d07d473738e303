"""--dtype bf16-weights: bf16 weights and gradients, fp32 master copies stepped by the optimizer, gradients
accumulated in fp32, checkpoints in fp32; a stopped run resumes exactly."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from safetensors.torch import load_file

from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.train.config import TrainConfig
from nanoseek.train.loop import train
from nanoseek.train.metrics import of_type, read_metrics
from nanoseek.train.precision import MasterWeights

STDLIB_JSON = str(Path(sysconfig.get_paths()["stdlib"]) / "json")


def test_master_weights_accumulate_in_fp32_and_refresh_the_model():
    torch.manual_seed(0)
    model = DeepSeekV3(ModelConfig.preset("tiny"))
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    masters = MasterWeights(model)
    named = dict(masters.named_parameters())
    assert named.keys() == reference.keys()
    for name, m in named.items():
        assert m.dtype == torch.float32 and torch.equal(m, reference[name])  # exact fp32 copies
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.layers[1].mlp.gate.weight.dtype == torch.float32  # routers stay fp32, stepped directly
    assert named["layers.1.mlp.gate.weight"] is model.layers[1].mlp.gate.weight

    ids = torch.randint(0, 256, (2, 9))
    grads = []
    for _ in range(2):  # two micro-batches accumulate into the fp32 master gradients
        model(ids).float().logsumexp(-1).mean().backward()
        grads.append(named["lm_head.weight"].grad.clone())
        assert model.lm_head.weight.grad is None  # the bf16 gradient is freed once added
    torch.testing.assert_close(grads[1], 2 * grads[0], rtol=1e-2, atol=1e-6)

    with torch.no_grad():
        named["lm_head.weight"].add_(1.0)
    masters.copy_to_model()
    torch.testing.assert_close(model.lm_head.weight.float(), named["lm_head.weight"], rtol=1e-2, atol=1e-2)
    with masters.fp32_weights():
        assert model.lm_head.weight.dtype == torch.float32
        assert torch.equal(model.lm_head.weight, named["lm_head.weight"])
    assert model.lm_head.weight.dtype == torch.bfloat16


def config(cache: Path, **kw) -> TrainConfig:
    settings = dict(preset="tiny", data=[STDLIB_JSON], vocab_size=300, seq_len=32, batch_size=4, grad_accum=2,
                    steps=6, warmup_steps=0, decay_start=1.0, mtp_lambda_switch=1.0, bias_gamma_switch=1.0,
                    save_every=3, eval_every=3, eval_batches=1, dtype="bf16-weights", threads=1, progress=False,
                    report=False, cache_dir=str(cache))
    settings.update(kw)
    return TrainConfig(**settings)


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in of_type(read_metrics(run / "metrics.jsonl"), "train")]


def test_bf16_weights_trains_saves_fp32_and_resumes_exactly(tmp_path):
    quiet = lambda _msg: None  # noqa: E731
    cache = tmp_path / "cache"
    train(config(cache), tmp_path / "full", log=quiet)
    train(config(cache, steps=3), tmp_path / "split", log=quiet)
    train(config(cache), tmp_path / "split", resume=True, log=quiet)
    full = losses(tmp_path / "full")
    assert full == losses(tmp_path / "split")  # bit for bit
    assert full[-1] < full[0]
    w_full = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    w_split = load_file(str(tmp_path / "split" / "checkpoint" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in w_full.values())  # the masters, not the bf16 copies
    assert all(torch.equal(w_full[k], w_split[k]) for k in w_full)
    train(config(cache, dtype="bf16"), tmp_path / "autocast", log=quiet)  # the same model under autocast
    assert abs(losses(tmp_path / "autocast")[0] - full[0]) < 0.02
