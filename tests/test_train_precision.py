"""--dtype bf16-weights: bf16 weights and gradients, fp32 master copies stepped by the optimizer, gradients
accumulated in fp32, checkpoints in fp32; a stopped run resumes exactly."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.train.config import TrainConfig
from nanoseek.train.loop import train
from nanoseek.train.metrics import of_type, read_metrics
from nanoseek.train.precision import MasterWeights, _compiled_update

STDLIB_JSON = str(Path(sysconfig.get_paths()["stdlib"]) / "json")


@pytest.mark.parametrize("fused", [False, True])
def test_master_weights_accumulate_in_fp32_and_refresh_the_model(fused):
    torch.manual_seed(0)
    model = DeepSeekV3(ModelConfig.preset("tiny"))
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    masters = MasterWeights(model, fused=fused)
    named = dict(masters.named_parameters())
    assert named.keys() == reference.keys()
    for name, m in named.items():
        assert m.dtype == torch.float32 and torch.equal(m, reference[name])  # exact fp32 copies
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.layers[1].mlp.gate.weight.dtype == torch.float32  # routers stay fp32, stepped directly
    assert named["layers.1.mlp.gate.weight"] is model.layers[1].mlp.gate.weight

    ids = torch.randint(0, 256, (2, 9))
    grads = []
    head = named["lm_head.weight"]
    for _ in range(2):  # two micro-batches accumulate into the fp32 master gradients
        model(ids).float().logsumexp(-1).mean().backward()
        grads.append(masters.gradient(head).clone())
        assert model.lm_head.weight.grad is None  # taken off the bf16 weight
        # fused step: after one micro-batch kept as the backward made it (bf16); else in the master's fp32 gradient
        kept = fused and len(grads) == 1
        assert (head.grad is None, grads[-1].dtype) == ((True, torch.bfloat16) if kept else (False, torch.float32))
    torch.testing.assert_close(grads[1], 2 * grads[0].float(), rtol=1e-2, atol=1e-6)

    with torch.no_grad():
        named["lm_head.weight"].add_(1.0)
    masters.copy_to_model()
    torch.testing.assert_close(model.lm_head.weight.float(), named["lm_head.weight"], rtol=1e-2, atol=1e-2)
    with masters.fp32_weights():
        assert model.lm_head.weight.dtype == torch.float32
        assert torch.equal(model.lm_head.weight, named["lm_head.weight"])
    assert model.lm_head.weight.dtype == torch.bfloat16


def run_steps(fused: bool, micro_batches: int, clip: float = 0.05):
    """One clipped AdamW step of a bf16-weights model; returns the model, masters, optimizer and gradient norm."""
    torch.manual_seed(0)
    model = DeepSeekV3(ModelConfig.preset("tiny"))
    masters = MasterWeights(model, fused=fused)
    optimizer = torch.optim.AdamW([p for _, p in masters.named_parameters()], lr=1e-2, betas=(0.9, 0.95),
                                  weight_decay=0.1)
    data = torch.Generator().manual_seed(1)
    for _ in range(micro_batches):
        ids = torch.randint(0, 256, (2, 9), generator=data)
        (model(ids).float().logsumexp(-1).mean() / micro_batches).backward()
    norm = masters.clip_grad_norm(clip)
    masters.step(optimizer)
    masters.zero_grad()
    return model, masters, optimizer, norm


def test_adamw_update_equals_torch_adamw():
    """The single-pass update (compiled, as the fused step runs it) against torch.optim.AdamW over 3 steps, with
    bf16 gradients and a clipping factor."""
    torch.manual_seed(0)
    start = torch.randn(1000)
    grads = [torch.randn(1000).bfloat16() for _ in range(3)]
    reference = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.AdamW([reference], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    master, m, v = start.clone(), torch.zeros(1000), torch.zeros(1000)
    weight = torch.empty(1000, dtype=torch.bfloat16)
    update = _compiled_update()
    for step, g in enumerate(grads, 1):
        reference.grad = g.float() * 0.5
        optimizer.step()
        hyper = torch.tensor([1e-2, 0.9, 0.95, 0.1, 1e-8, 1e-2 / (1 - 0.9 ** step), (1 - 0.95 ** step) ** -0.5, 0.5])
        update(master, g, m, v, weight, hyper)
        torch.testing.assert_close(master, reference.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(m, optimizer.state[reference]["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(v, optimizer.state[reference]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
        assert torch.equal(weight, master.bfloat16())
    assert (master - start).abs().min() > 0  # every element moved


def test_fused_master_step_equals_the_eager_step():
    """The compiled single-pass step (nanoseek train --compile) against the eager one (fp32 gradients, clipping,
    torch.optim.AdamW, refresh): same norm, masters, moments and bf16 weights, with one micro-batch (bf16
    gradients) and two (fp32 sums), clipped (max norm 0.05) or not (1e3: the gradients as they are, never scaled
    up); its state is torch's, so an eager optimizer continues it."""
    for micro_batches, clip in ((1, 0.05), (2, 0.05), (1, 1e3)):
        model_e, masters_e, opt_e, norm_e = run_steps(False, micro_batches, clip)
        model_f, masters_f, opt_f, norm_f = run_steps(True, micro_batches, clip)
        assert norm_f == pytest.approx(norm_e, rel=1e-6) and 0.05 < norm_e < 1e3  # clipping active at 0.05 only
        for (name, m_e), (_, m_f) in zip(masters_e.named_parameters(), masters_f.named_parameters()):
            torch.testing.assert_close(m_f, m_e, rtol=1e-6, atol=1e-6, msg=name)
            assert (m_f in opt_f.state) == (m_e in opt_e.state)  # both step the same parameters
            if m_e not in opt_e.state:  # no gradient (not reached by this loss)
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt_f.state[m_f][key], opt_e.state[m_e][key], rtol=1e-5, atol=1e-12)
            assert float(opt_f.state[m_f]["step"]) == float(opt_e.state[m_e]["step"]) == 1
            assert not torch.equal(m_f, m_e.detach().clone().zero_())  # (not a zero tensor on both sides)
        for w_e, w_f in zip(model_e.parameters(), model_f.parameters()):
            assert w_f.dtype == w_e.dtype
            # masters a rounding apart may round to neighbouring bf16 values
            torch.testing.assert_close(w_f.float(), w_e.float(), rtol=2 ** -7, atol=1e-6)
    restored = torch.optim.AdamW([p for _, p in masters_f.named_parameters()], lr=1e-2, betas=(0.9, 0.95),
                                 weight_decay=0.1)
    restored.load_state_dict(opt_f.state_dict())
    masters_f.fused = False
    model_f(torch.randint(0, 256, (2, 9))).float().logsumexp(-1).mean().backward()
    masters_f.clip_grad_norm(1.0)
    masters_f.step(restored)
    assert all(float(restored.state[p]["step"]) == 2 for _, p in masters_f.named_parameters() if p in opt_f.state)


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
