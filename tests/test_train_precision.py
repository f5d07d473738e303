"""--dtype bf16-weights: bf16 weights and gradients, fp32 master copies stepped by the optimizer, gradients
accumulated in fp32, checkpoints in fp32; a stopped run resumes exactly."""

from __future__ import annotations

import contextlib
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.train.config import TrainConfig
from nanoseek.train.loop import train
from nanoseek.train.metrics import of_type, read_metrics
from nanoseek.train import precision
from nanoseek.train.precision import MasterWeights, _compiled_update, adamw_update

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


@pytest.mark.parametrize("compiled", [False, True])
def test_adamw_update_keeps_bf16_moments(compiled):
    """Moments in bf16 (DeepSeek-V3's optimizer states): each step computes them in fp32 from the stored bf16
    values, updates the master with the unrounded ones and stores them rounded, by hand over 3 steps."""
    torch.manual_seed(0)
    start = torch.randn(1000)
    grads = [torch.randn(1000).bfloat16() for _ in range(3)]
    master, m, v = start.clone(), torch.zeros(1000, dtype=torch.bfloat16), torch.zeros(1000, dtype=torch.bfloat16)
    weight = torch.empty(1000, dtype=torch.bfloat16)
    expected, m_prev, v_prev = start.clone(), torch.zeros(1000), torch.zeros(1000)
    update = _compiled_update() if compiled else adamw_update
    lr, b1, b2, wd, eps, scale = 1e-2, 0.9, 0.95, 0.1, 1e-8, 0.5
    for step, g in enumerate(grads, 1):
        hyper = torch.tensor([lr, b1, b2, wd, eps, lr / (1 - b1 ** step), (1 - b2 ** step) ** -0.5, scale])
        update(master, g, m, v, weight, hyper)
        g32 = g.float() * scale
        m_new = b1 * m_prev + (1 - b1) * g32
        v_new = b2 * v_prev + (1 - b2) * g32 * g32
        expected = expected * (1 - lr * wd) - lr / (1 - b1 ** step) * m_new / (
            v_new.sqrt() / (1 - b2 ** step) ** 0.5 + eps)
        m_prev, v_prev = m_new.bfloat16().float(), v_new.bfloat16().float()  # what is stored
        assert m.dtype == v.dtype == torch.bfloat16
        # stored rounded: the same as the hand-made value rounded, or the neighbouring bf16 value (lerp rounds the
        # fp32 value differently)
        torch.testing.assert_close(m.float(), m_prev, rtol=2 ** -7, atol=0)
        torch.testing.assert_close(v.float(), v_prev, rtol=2 ** -7, atol=0)
        torch.testing.assert_close(master, expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(weight, master.bfloat16())
        m_prev, v_prev = m.float(), v.float()  # go on from what the step stored
    assert v.float().min() > 0


def test_master_weights_with_bf16_moments_fused_eager_and_resumed():
    """states_dtype=bf16: the fused and the eager step agree and keep bf16 moments; through torch's
    state_dict (which casts the moments to the masters' fp32, exactly) the next step stores them in bf16 again."""
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = DeepSeekV3(ModelConfig.preset("tiny"))
        masters = MasterWeights(model, fused=fused, states_dtype=torch.bfloat16)
        params = [p for _, p in masters.named_parameters()]
        optimizer = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        model(torch.randint(0, 256, (2, 9))).float().logsumexp(-1).mean().backward()
        masters.clip_grad_norm(0.05)
        masters.step(optimizer)
        masters.zero_grad()
        states = [optimizer.state[p] for p in params if p in optimizer.state]
        assert states and all(s[k].dtype == torch.bfloat16 for s in states for k in ("exp_avg", "exp_avg_sq"))
        results.append((params, states, model, optimizer, masters))
    (p_e, s_e, *_), (p_f, s_f, model, optimizer, masters) = results
    for a, b in zip(p_e, p_f):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(s_e, s_f):
        for key in ("exp_avg", "exp_avg_sq"):  # fp32 values a rounding apart may round to neighbouring bf16 ones
            torch.testing.assert_close(a[key].float(), b[key].float(), rtol=2 ** -7, atol=1e-12)
    restored = torch.optim.AdamW(p_f, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    restored.load_state_dict(optimizer.state_dict())
    loaded = [restored.state[p] for p in p_f if p in restored.state]
    assert all(s["exp_avg"].dtype == torch.float32 for s in loaded)  # torch casts to the parameter's dtype
    assert all(torch.equal(a["exp_avg"].float(), b["exp_avg"]) for a, b in zip(s_f, loaded))  # exactly
    model(torch.randint(0, 256, (2, 9))).float().logsumexp(-1).mean().backward()
    masters.clip_grad_norm(1.0)
    masters.step(restored)
    assert all(s["exp_avg_sq"].dtype == torch.bfloat16 and float(s["step"]) == 2
               for p in p_f if (s := restored.state.get(p)))


def test_bf16_moments_need_bf16_weights():
    with pytest.raises(ValueError, match="needs --dtype bf16-weights, not --dtype bf16$"):
        TrainConfig(optimizer_states="bf16", dtype="bf16").validate()
    with pytest.raises(ValueError, match="--optimizer-states must be one of fp32, bf16, got 'fp16'"):
        TrainConfig(optimizer_states="fp16", dtype="bf16-weights").validate()
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        MasterWeights(DeepSeekV3(ModelConfig.preset("tiny")), states_dtype=torch.float16)


@pytest.mark.skipif(precision._kernel() is None,
                    reason="the kernel needs Linux on an x86 CPU with AVX-512 bf16 and a C++ compiler")
@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000, 100_003])
def test_adamw_kernel_equals_adamw_update(n):
    """csrc/master_adamw.cpp against adamw_update from the same state, for each gradient dtype, moment dtype and
    with or without a bf16 weight, at sizes that end inside a 16-element block; on 1 and 2 threads."""
    g = torch.Generator().manual_seed(n)
    for grad_dtype in (torch.bfloat16, torch.float32):
        for moments in (torch.float32, torch.bfloat16):
            for with_weight in (True, False):
                master = torch.randn(n, generator=g)
                grad = torch.randn(n, generator=g).to(grad_dtype)
                m = (torch.randn(n, generator=g) * 0.1).to(moments)
                v = (torch.rand(n, generator=g) * 0.01).to(moments)
                weight = torch.empty(n, dtype=torch.bfloat16) if with_weight else None
                ours = [t if t is None else t.clone() for t in (master, grad, m, v, weight)]
                theirs = [t if t is None else t.clone() for t in (master, grad, m, v, weight)]
                hyper = torch.tensor([1e-2, 0.9, 0.95, 0.1, 1e-8, 1e-2 / (1 - 0.9 ** 3), (1 - 0.95 ** 3) ** -0.5, 0.7])
                assert precision._kernel_takes(*ours)
                with threads(1 + n % 2):
                    precision._kernel_update(*ours, hyper)
                adamw_update(*theirs, hyper)
                torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-7)
                assert not torch.equal(ours[0], master)  # it moved
                for a, b in zip(ours[2:4], theirs[2:4]):  # fp32 values a rounding apart round alike or 1 ulp apart
                    assert a.dtype == moments
                    torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7 if moments == torch.bfloat16
                                               else 1e-6, atol=1e-12)
                if with_weight:
                    assert torch.equal(ours[4], ours[0].bfloat16())
    assert not precision._kernel_takes(master, grad, m, v.double(), None)  # dtypes it does not take
    assert not precision._kernel_takes(master, grad[:-1] if n > 1 else grad[:0], m, v, None)  # sizes differ


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def config(cache: Path, **kw) -> TrainConfig:
    settings = dict(preset="tiny", data=[STDLIB_JSON], vocab_size=300, seq_len=32, batch_size=4, grad_accum=2,
                    steps=6, warmup_steps=0, decay_start=1.0, mtp_lambda_switch=1.0, bias_gamma_switch=1.0,
                    save_every=3, eval_every=3, eval_batches=1, dtype="bf16-weights", threads=1, progress=False,
                    report=False, cache_dir=str(cache))
    settings.update(kw)
    return TrainConfig(**settings)


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in of_type(read_metrics(run / "metrics.jsonl"), "train")]


@pytest.mark.parametrize("states", ["fp32", "bf16"])
def test_bf16_weights_trains_saves_fp32_and_resumes_exactly(tmp_path, states):
    quiet = lambda _msg: None  # noqa: E731
    cache = tmp_path / "cache"
    train(config(cache, optimizer_states=states), tmp_path / "full", log=quiet)
    train(config(cache, steps=3, optimizer_states=states), tmp_path / "split", log=quiet)
    train(config(cache, optimizer_states=states), tmp_path / "split", resume=True, log=quiet)
    full = losses(tmp_path / "full")
    assert full == losses(tmp_path / "split")  # bit for bit
    assert full[-1] < full[0]
    w_full = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    w_split = load_file(str(tmp_path / "split" / "checkpoint" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in w_full.values())  # the masters, not the bf16 copies
    assert all(torch.equal(w_full[k], w_split[k]) for k in w_full)
    state = load_file(str(tmp_path / "split" / "checkpoint" / "training_state.safetensors"))
    moments = {t.dtype for k, t in state.items() if k.endswith(("exp_avg", "exp_avg_sq"))}
    assert moments == {torch.bfloat16 if states == "bf16" else torch.float32}
    if states == "bf16":
        return
    train(config(cache, dtype="bf16"), tmp_path / "autocast", log=quiet)  # the same model under autocast
    assert abs(losses(tmp_path / "autocast")[0] - full[0]) < 0.02
