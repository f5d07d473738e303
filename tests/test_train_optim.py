"""AdamW parameter groups and the schedules of SPEC §4-§6."""

import math

import pytest

from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.train import optim
from nanoseek.train.config import TrainConfig


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = DeepSeekV3(ModelConfig.preset("tiny"))
    groups = optim.parameter_groups(model, 0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "embed_tokens.weight" in no_decay["names"]
    assert all(n.endswith("norm.weight") or "embed" in n for n in no_decay["names"])
    assert "lm_head.weight" in decay["names"] and "layers.1.mlp.experts.gate_up_proj" in decay["names"]
    assert "layers.1.mlp.gate.weight" in decay["names"]  # router centroids are a matrix
    names = set(decay["names"]) | set(no_decay["names"])
    assert names == {n for n, _ in model.named_parameters()}
    with_emb = optim.parameter_groups(model, 0.1, decay_embeddings=True)
    assert "embed_tokens.weight" in with_emb[0]["names"]
    everything = optim.parameter_groups(model, 0.1, decay_embeddings=True, decay_norms_and_biases=True)
    assert len(everything) == 1
    opt = optim.build_optimizer(model, TrainConfig())
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.param_groups[1]["weight_decay"] == 0.0
    assert opt.param_groups[0]["weight_decay"] == 0.1 and TrainConfig().grad_clip == 1.0  # SPEC §6 defaults


def test_build_optimizer_takes_its_settings_from_the_config():
    """build_optimizer applies the run's weight decay, betas and eps (not AdamW's or SPEC §6's defaults) and
    its group options: every RMSNorm weight (the model's 1-D parameters) and the embedding undecayed, every
    matrix decayed; --decay-embeddings and --decay-norms-and-biases move them into the decayed group."""
    model = DeepSeekV3(ModelConfig.preset("tiny"))
    cfg = TrainConfig(weight_decay=0.05, beta1=0.8, beta2=0.9, eps=1e-6)
    decay, no_decay = optim.build_optimizer(model, cfg).param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 for g in (decay, no_decay))
    names = [n for n, _ in model.named_parameters()]
    norms = {n for n in names if n.endswith("norm.weight")}  # 20 of them: layers, MLA's q/kv, MTP, final
    assert len(norms) == 20 and set(no_decay["names"]) == norms | {"embed_tokens.weight"}
    assert set(decay["names"]) == set(names) - norms - {"embed_tokens.weight"}
    decay, no_decay = optim.build_optimizer(model, cfg.replace(decay_embeddings=True)).param_groups
    assert "embed_tokens.weight" in decay["names"] and set(no_decay["names"]) == norms
    (everything,) = optim.build_optimizer(model, cfg.replace(decay_embeddings=True,
                                                             decay_norms_and_biases=True)).param_groups
    assert everything["weight_decay"] == 0.05 and len(everything["params"]) == len(names)


def test_learning_rate_warmup_constant_cosine():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, decay_start=0.5, min_lr_ratio=0.1)
    lr = [optim.learning_rate(s, cfg) for s in range(100)]
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3)
    assert all(x == pytest.approx(1e-3) for x in lr[10:51])
    assert all(a >= b for a, b in zip(lr[50:], lr[51:]))
    assert lr[99] == pytest.approx(1e-4)
    mid = 50 + 49 / 2
    assert optim.learning_rate(int(mid), cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 50) / 49)))


def test_deepseek_v3_schedule_with_its_constant_tails():
    """SPEC §6 at one step per billion tokens: 2.2e-4 to 10T, cosine to 2.2e-5 at 14.3T, held for 333B tokens,
    then 7.3e-6 for the last 167B."""
    cfg = TrainConfig(steps=14800, lr=2.2e-4, warmup_steps=2, decay_start=10 / 14.8, decay_end=14.3 / 14.8,
                      min_lr_ratio=0.1, final_start=14.633 / 14.8, final_lr_ratio=7.3e-6 / 2.2e-4)
    lr = [optim.learning_rate(s, cfg) for s in range(14800)]
    assert lr[0] == pytest.approx(1.1e-4) and lr[1] == lr[9999] == pytest.approx(2.2e-4)
    assert lr[10000 + 4299 // 2] == pytest.approx(2.2e-5 + 1.98e-4 * 0.5 * (1 + math.cos(math.pi * (4299 // 2) / 4299)))
    assert all(a > b for a, b in zip(lr[10000:14299], lr[10001:14300]))
    assert all(x == pytest.approx(2.2e-5) for x in lr[14299:14633])
    assert all(x == pytest.approx(7.3e-6) for x in lr[14633:])
    for bad, message in (({"decay_end": 0.4}, "--decay-end"), ({"final_start": 0.99}, "give both"),
                         ({"final_start": 0.9, "final_lr_ratio": 0.01}, "--final-start"),
                         ({"final_start": 0.99, "final_lr_ratio": 2.0}, "--final-lr-ratio")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**{"decay_start": 0.5, "decay_end": 0.95, **bad}).validate()


def test_lambda_and_gamma_switch_to_their_later_values():
    cfg = TrainConfig(steps=100, mtp_lambda=0.3, mtp_lambda_later=0.1, mtp_lambda_switch=0.68,
                      bias_gamma=0.001, bias_gamma_later=0.0, bias_gamma_switch=0.97)
    assert optim.mtp_lambda(67, cfg) == 0.3 and optim.mtp_lambda(68, cfg) == 0.1
    assert optim.bias_gamma(96, cfg) == 0.001 and optim.bias_gamma(97, cfg) == 0.0
    assert optim.bias_gamma(0, cfg.replace(balance="aux")) == 0.0
    assert cfg.effective_balance_alpha == 1e-4
    assert cfg.replace(balance="aux").effective_balance_alpha == 0.01
    assert cfg.replace(balance="none").effective_balance_alpha == 0.0
    assert cfg.replace(balance="aux", balance_alpha=0.05).effective_balance_alpha == 0.05


def test_switch_and_decay_steps_ignore_float_noise():
    # 0.68 x 10000 = 6800.000000000001 and 0.29 x 100 = 28.999999999999996 in binary floating point
    cfg = TrainConfig(steps=10000, mtp_lambda=0.3, mtp_lambda_later=0.1, mtp_lambda_switch=0.68)
    assert optim.mtp_lambda(6799, cfg) == 0.3 and optim.mtp_lambda(6800, cfg) == 0.1
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=0, decay_start=0.29, min_lr_ratio=0.1)
    assert optim.learning_rate(29, cfg) == 1e-3 and optim.learning_rate(30, cfg) < 1e-3
    # a decay start between two steps (0.505 x 100 = 50.5): the cosine starts at step 50 (its top), so step 51,
    # the first after 50.5, is already below lr (decay_last 99: progress 1/49)
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=0, decay_start=0.505, min_lr_ratio=0.1)
    assert optim.learning_rate(50, cfg) == 1e-3
    assert optim.learning_rate(51, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 49)))


def test_batch_size_warmup_grows_the_step_linearly_in_tokens():
    """SPEC §6: the batch grows from the start's sequences to the full batch over the warmup tokens, in whole
    micro-batches (rounded down); hand values, then V3's 3072 -> 15360 sequences over 469B tokens."""
    cfg = TrainConfig(batch_size=2, grad_accum=4, batch_warmup_start=2, batch_warmup_tokens=600)
    # sequences = 2 + (8 - 2) x tokens // 600, then // 2 micro-batches
    assert [optim.micro_batches(t, cfg) for t in (0, 64, 199, 200, 399, 400, 599, 600, 10**6)] == \
        [1, 1, 1, 2, 2, 3, 3, 4, 4]
    assert optim.micro_batches(123, TrainConfig(grad_accum=4)) == 4  # no warmup: the full batch
    v3 = TrainConfig(batch_size=1536, grad_accum=10, batch_warmup_start=3072, batch_warmup_tokens=469 * 10**9)
    assert optim.micro_batches(0, v3) == 2  # 3072 sequences
    assert optim.micro_batches(469 * 10**9 // 2, v3) == 6  # 3072 + 12288 / 2 = 9216 sequences
    assert optim.micro_batches(469 * 10**9 - 1, v3) == 9  # 15359.99 sequences: rounded down
    assert optim.micro_batches(469 * 10**9, v3) == 10  # 15360, held after


@pytest.mark.parametrize("settings, message", [
    (dict(batch_warmup_start=4), "--batch-warmup-start and --batch-warmup-tokens go together"),
    (dict(batch_warmup_tokens=100), "--batch-warmup-start and --batch-warmup-tokens go together"),
    (dict(batch_warmup_start=3, batch_warmup_tokens=100), "a positive multiple of --batch-size 2"),
    (dict(batch_warmup_start=8, batch_warmup_tokens=100), "must be below the full batch"),
    (dict(batch_warmup_start=2, batch_warmup_tokens=0), "--batch-warmup-tokens must be a positive integer"),
])
def test_batch_size_warmup_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(batch_size=2, grad_accum=4, **settings).validate()
