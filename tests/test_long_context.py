"""Long context: YaRN's frequencies and temperature for the extension recipe's configuration (by hand, SPEC §2),
chunked prefill against one-shot prefill, the passkey task, the recipe's per-stage settings (V3's numbers
included), bad input, and a tiny end-to-end `nanoseek extend` + `nanoseek eval-long`.

V3's own correction range (10, 23), m = 1.3689 and softmax scale 0.13523 are tested in test_model.py and
test_config.py; here the same formulas are checked where the recipe uses them (a short original length, a
clamped ramp, the position-interpolation property) and the recipe is checked to produce V3's configuration.
"""

import json
import math
import re
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from nanoseek import ModelConfig
from nanoseek.cli import main
from nanoseek.eval_long import cache_report, markdown_tables, passkey_correct, position_losses, prefill_hidden
from nanoseek.model import DeepSeekV3
from nanoseek.model.rope import RotaryEmbedding, rope_attention_factor, rope_frequencies, yarn_correction_range
from nanoseek.passkey import (EVAL_DEPTHS, PASSKEY_NEEDLE, PASSKEY_QUESTION, TRAIN_DEPTHS, PasskeyExample, PasskeyMaker,
                              PasskeyTooShort, passkey_examples)
from nanoseek.train import TrainConfig, train
from nanoseek.train.extend import plan_stages, sample_documents, stage_batch, write_split_jsonl
from nanoseek.train.optim import learning_rate

STDLIB_JSON = str(Path(sysconfig.get_paths()["stdlib"]) / "json")


def demo_yarn(**kw) -> ModelConfig:
    """The demo preset after `nanoseek extend --stages 4,16` of a run at L = 128: s = 16, original 128."""
    return ModelConfig.preset("demo").replace(**{**dict(rope_scaling_type="yarn", rope_factor=16.0,
                                                        original_max_position_embeddings=128), **kw})


# ------------------------------------------------------------------------------------------ YaRN by hand
def test_yarn_recipe_config_by_hand():
    """d_R = 16, base 1e4, L = 128, s = 16 (SPEC §2): corr(32) = 16 ln(128 / 64 pi) / (2 ln 1e4) = -0.392, so
    low = floor -> -1, clamped to 0; corr(1) = 16 ln(128 / 2 pi) / (2 ln 1e4) = 2.618, high = 3."""
    cfg = demo_yarn()
    corr = lambda r: 16 * math.log(128 / (2 * math.pi * r)) / (2 * math.log(1e4))  # noqa: E731
    assert corr(32) == pytest.approx(-0.39224, abs=1e-5) and corr(1) == pytest.approx(2.61807, abs=1e-5)
    assert yarn_correction_range(32, 1, 16, 1e4, 128) == (0, 3)
    theta = [10.0 ** (-i / 2) for i in range(8)]  # 1e4^(-2i/16)
    ramp = [0, 1 / 3, 2 / 3, 1, 1, 1, 1, 1]
    expected = [t / 16 * r + t * (1 - r) for t, r in zip(theta, ramp)]
    assert expected[1] == pytest.approx(0.316228 * 0.6875, rel=1e-5)  # (1/3)/16 + 2/3 of theta_1
    assert expected[2] == pytest.approx(0.1 * 0.375, rel=1e-9)  # (2/3)/16 + 1/3 of theta_2
    torch.testing.assert_close(rope_frequencies(cfg), torch.tensor(expected), rtol=1e-6, atol=0)
    m = 0.1 * math.log(16) + 1  # m(16, mscale_all_dim = 1) = 1.27726
    assert m == pytest.approx(1.27726, abs=1e-5)
    assert cfg.softmax_scale == pytest.approx(48 ** -0.5 * m * m, rel=1e-12)  # (d_h + d_h^R)^-0.5 m^2 = 0.23547
    assert cfg.softmax_scale == pytest.approx(0.23547, abs=1e-5)
    assert rope_attention_factor(cfg) == 1.0  # m(s, mscale) / m(s, mscale_all_dim) with both 1


def test_yarn_interpolated_dims_turn_s_times_slower():
    """Position interpolation: a fully interpolated dim at position s * p has the original angle at p; a dim
    below the ramp (more than beta_fast turns within L) keeps its angle."""
    plain, yarn = RotaryEmbedding(ModelConfig.preset("demo")), RotaryEmbedding(demo_yarn())
    p = torch.tensor([[0, 1, 37, 127]])
    cos0, sin0 = plain(p)
    cos1, sin1 = yarn(p * 16)
    torch.testing.assert_close(cos1[..., 3:], cos0[..., 3:], atol=2e-5, rtol=0)
    torch.testing.assert_close(sin1[..., 3:], sin0[..., 3:], atol=2e-5, rtol=0)
    cos2, _ = yarn(p)
    torch.testing.assert_close(cos2[..., 0], cos0[..., 0])


def test_yarn_zero_width_ramp_and_no_scaling():
    """An original length below 2 pi: both ends clamp to 0, high gets +0.001 (SPEC §2), so dim 0 keeps theta_0
    and every other dim is divided by s. m(s) = 1 for s <= 1."""
    cfg = demo_yarn(original_max_position_embeddings=4)
    assert yarn_correction_range(32, 1, 16, 1e4, 4) == (0, 0)
    theta = torch.tensor([10.0 ** (-i / 2) for i in range(8)])
    torch.testing.assert_close(rope_frequencies(cfg), torch.cat((theta[:1], theta[1:] / 16)), rtol=1e-6, atol=0)
    one = demo_yarn(rope_factor=1.0)
    assert one.softmax_scale == 48 ** -0.5 and rope_attention_factor(one) == 1.0


# ------------------------------------------------------------------------------------------ chunked prefill
def tiny_yarn_model(seed=0) -> DeepSeekV3:
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("tiny").replace(rope_factor=4.0, original_max_position_embeddings=16,
                                             max_position_embeddings=64)
    return DeepSeekV3(cfg).eval()


@pytest.mark.parametrize("chunk", [7, 16, 64])
@torch.no_grad()
def test_chunked_prefill_equals_one_shot(chunk):
    """Prefill in chunks over the latent cache = one forward of the whole input (fp32, 1e-5), past YaRN's
    original length; position_losses = the one-shot per-position cross-entropy."""
    model = tiny_yarn_model()
    ids = torch.randint(0, 256, (2, 51))
    full = model(ids[:, :-1])  # (2, 50, V)
    parts = [(s, e, model.lm_head(h)) for s, e, h in prefill_hidden(model, ids[:, :-1], chunk)]
    assert [(s, e) for s, e, _ in parts] == [(s, min(s + chunk, 50)) for s in range(0, 50, chunk)]
    torch.testing.assert_close(torch.cat([x for _, _, x in parts], 1), full, atol=1e-5, rtol=1e-5)
    ce = torch.nn.functional.cross_entropy(full.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(2, 50)
    torch.testing.assert_close(position_losses(model, ids, chunk, batch_size=1), ce.mean(0).double(),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("speculative", [False, True])
def test_memory_bounded_attention_paths_are_exact(monkeypatch, speculative):
    """Past the budgets a chunk attends over the latent (absorbed, then flash attention in MQA form) instead of
    up-projecting the whole prefix: forced on here, the chunked prefill still equals one forward (fp32, 1e-5),
    and generation is unchanged."""
    from nanoseek.inference import generate
    from nanoseek.inference import speculative as spec
    from nanoseek.model import attention

    model = tiny_yarn_model(1)
    ids = torch.randint(0, 256, (2, 41))
    full = model(ids)
    prompt = ids[0, :30].tolist()
    before = generate(model, [prompt], 8, speculative=speculative).tokens
    monkeypatch.setattr(attention, "EXPANDED_KV_BUDGET", 0)
    monkeypatch.setattr(attention, "SCORES_BUDGET", 0)
    parts = torch.cat([model.lm_head(h) for _, _, h in prefill_hidden(model, ids, 16)], 1)
    torch.testing.assert_close(parts, full, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(spec, "PREFILL_CHUNK", 7)
    assert generate(model, [prompt], 8, speculative=speculative).tokens == before


def test_generate_prefill_chunks_do_not_change_the_output(monkeypatch):
    """nanoseek.generate prefills in PREFILL_CHUNK pieces: 5-token chunks give the same greedy tokens as one."""
    from nanoseek.inference import generate
    from nanoseek.inference import speculative

    model = tiny_yarn_model(1)
    prompt = torch.randint(0, 256, (40,)).tolist()
    one = generate(model, [prompt], 8).tokens
    monkeypatch.setattr(speculative, "PREFILL_CHUNK", 5)
    assert generate(model, [prompt], 8).tokens == one
    assert one[0][0] == int(model(torch.tensor([prompt]))[0, -1].argmax())


def test_latent_cache_at_128k_for_deepseek_v3(capsys):
    r = cache_report(ModelConfig.preset("deepseek-v3"), 128 * 1024, 2)
    assert r["latent_bytes"] == 35_136 * 131_072 * 2 == 9_210_691_584  # 8.58 GiB
    assert r["mha_bytes"] == 2 * 128 * 128 * 61 * 131_072 * 2  # 488 GiB
    assert r["mha_over_latent"] == pytest.approx(56.89, abs=0.01)
    assert main(["info", "--preset", "deepseek-v3", "--context", "131072"]) == 0
    out = capsys.readouterr().out
    assert "9,210,691,584 bytes" in out and "8.58 GiB" in out and "488.0 GiB" in out


# ------------------------------------------------------------------------------------------ passkey
@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE in nanoseek's layout, trained on a little English (fast)."""
    from nanoseek.train.tokenizer_train import train_bpe

    text = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
            "What is the pass key? The pass key is 12345. Remember it. ") * 20
    return train_bpe([text], 400)


def test_passkey_examples_have_the_exact_length_and_the_key_last(bpe):
    maker = PasskeyMaker(bpe)
    for length in (64, 97, 200, 513):
        for depth in (0.0, 0.35, 1.0):
            e = maker.make(length, depth, "40719", phase=length)
            assert len(e.ids) + 2 == length
            assert bpe.decode(e.ids[-e.answer_len:]).strip() == "40719"
            needle = e.text.index("The pass key is 40719.")
            assert (needle == 0) == (depth == 0.0)
            assert e.text.endswith("What is the pass key? The pass key is 40719")
    assert not set(TRAIN_DEPTHS) & set(EVAL_DEPTHS)
    with pytest.raises(ValueError, match="needs at least"):
        maker.make(12, 0.5, "40719")


def test_passkey_needle_sits_at_its_depth_of_the_filler(bpe):
    """The needle starts at token depth x F of the example's ids, within 4 tokens, F being the ids left once the
    needle's and the question's tokens are taken out (the filler and its line breaks): both counted here from
    the text by encoding it, not from the maker's word counts. 4 tokens cover a filler word cut at the needle,
    its line break and the pad words; at 513 tokens, a needle at half its depth is 44 to 236 tokens off."""
    maker = PasskeyMaker(bpe)
    encode = lambda text: bpe.encode(text, add_special_tokens=False).ids  # noqa: E731
    for length in (97, 200, 513):
        for depth in (0.2, 0.5, 0.8, 1.0):
            for phase, key in ((0, "40719"), (7, "83512")):
                e = maker.make(length, depth, key, phase=phase)
                needle, question = encode(PASSKEY_NEEDLE.format(key=key)), encode(PASSKEY_QUESTION.format(key=key))
                start = len(encode(e.text[: e.text.index(PASSKEY_NEEDLE.format(key=key))]))
                assert e.ids[start: start + len(needle)] == needle  # the needle's own tokens start there
                filler = len(e.ids) - len(needle) - len(question)
                assert abs(start - depth * filler) <= 4, (length, depth, phase, start, filler)


def test_passkey_examples_leave_out_a_length_too_short_only_when_asked(bpe):
    with pytest.raises(PasskeyTooShort, match="needs at least"):
        passkey_examples(bpe, [12, 64], [0.5], 2, seed=0)
    examples = passkey_examples(bpe, [12, 64], [0.0, 0.5], 2, seed=0, skip_short=True)
    assert [e.length for e in examples] == [64] * 4


def test_a_tokenizer_without_a_one_token_filler_word_says_how_to_leave_passkeys_out():
    """A small vocabulary (here digits only) makes no filler word one token: the error names the options that
    leave passkeys out, as the too-short errors do, instead of only stopping `eval-long` or `extend`."""
    from nanoseek.train.tokenizer_train import train_bpe

    with pytest.raises(ValueError, match=r"no single-token filler word.*`eval-long --passkey-samples 0`"):
        PasskeyMaker(train_bpe(["0123456789 " * 50], 260))


def test_passkey_lengths_just_above_the_minimum_are_met_or_too_short(bpe):
    """Near the minimum the filler is pad words alone, and the first one starts its line (no space before it:
    two tokens here): each length is met exactly, or is PasskeyTooShort, never another error."""
    maker = PasskeyMaker(bpe)
    for length in range(30, 70):
        for depth in (0.0, 0.5, 1.0):
            for key in ("40719", "60200"):
                try:
                    e = maker.make(length, depth, key, phase=length)
                except PasskeyTooShort:
                    assert length < 60
                    continue
                assert len(e.ids) + 2 == length


@torch.no_grad()
def test_passkey_scoring_is_teacher_forced_greedy():
    """An example whose 'key' is the model's own greedy continuation scores True; one wrong token, False."""
    model = tiny_yarn_model(2)
    prefix = torch.randint(2, 256, (30,)).tolist()
    seq = [0] + prefix
    for _ in range(3):  # greedy continuation: 3 answer tokens
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    good = PasskeyExample("", seq[1:], "", 3, len(seq) + 1, 0.5)
    bad_ids = seq[1:-1] + [(seq[-1] + 1) % 256]
    bad = PasskeyExample("", bad_ids, "", 3, len(seq) + 1, 0.5)
    other = PasskeyExample("", seq[1:20], "", 2, 21, 0.5)  # another length: batched separately
    assert passkey_correct(model, [good, bad, other], bos_id=0, chunk=7, batch_size=2)[:2] == [True, False]


def test_split_jsonl_reproduces_the_split(tmp_path):
    from nanoseek.train.data import load_corpus

    path = tmp_path / "c.jsonl"
    train_texts, val_texts = [f"train {i}" for i in range(50)], [f"val {i}" for i in range(7)]
    write_split_jsonl(path, train_texts, val_texts, 0.1)
    corpus = load_corpus([str(path)], val_fraction=0.1)
    assert [d.text for d in corpus.train] == train_texts and [d.text for d in corpus.val] == val_texts


def test_stage_documents_sample_a_budget_in_corpus_order():
    """The base documents a stage trains on: at least max_chars characters, stopping at the document that reaches
    them, spread over the corpus (not its first documents), in corpus order, the same on every call."""
    from nanoseek.train.data import Document

    docs = [Document(f"c.jsonl:{i}", "x" * (10 + i)) for i in range(40)]  # 1180 characters
    sample = sample_documents(docs, 200)
    total = sum(len(d.text) for d in sample)
    assert 200 <= total < 200 + 49  # stops once the budget is reached
    assert [docs.index(d) for d in sample] == sorted(docs.index(d) for d in sample)
    assert sample != docs[:len(sample)]
    assert sample_documents(docs, 200) == sample
    assert sample_documents(docs, None) == docs and sample_documents(docs, 1180) == docs


# ------------------------------------------------------------------------------------------ the recipe's settings
def demo_base(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(preset="demo", seq_len=128, batch_size=32, steps=300), **kw})


def test_recipe_stages_scaled_to_a_demo_run(tmp_path):
    base = demo_base()
    stages = plan_stages(base, ModelConfig.preset("demo"), tmp_path / "ext", tmp_path / "base", [4, 16])
    assert [s.seq_len for s in stages] == [512, 2048]
    for s in stages:
        c = s.config
        keys = ("rope_scaling_type", "rope_factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                "mscale", "mscale_all_dim", "max_position_embeddings")
        rope = {k: c.model_overrides[k] for k in keys}
        assert rope == dict(rope_scaling_type="yarn", rope_factor=16.0, original_max_position_embeddings=128,
                            beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                            max_position_embeddings=2048)  # one YaRN setting for both stages, as V3
        assert c.tokens_per_step == base.tokens_per_step == 4096  # 32 x 128 = 8 x 512 = 2 x 2048
        assert c.lr == pytest.approx(3e-4)  # the base schedule's final value (3e-3 x 0.1)
        assert c.steps == 300 and c.warmup_steps == 15
        assert all(learning_rate(i, c) == pytest.approx(3e-4) for i in range(15, 300))
        assert c.mtp_lambda == c.mtp_lambda_later == 0.1 and c.bias_gamma == c.bias_gamma_later == 0.0
    assert (stages[0].config.batch_size, stages[1].config.batch_size) == (8, 2)
    assert stages[0].config.init_from == str((tmp_path / "base").resolve())
    assert stages[1].config.init_from == str((tmp_path / "ext" / "stage-1").resolve())
    assert stage_batch(demo_base(batch_size=4, grad_accum=8), 2048) == (1, 2)  # micro-batches <= the base's tokens


def test_recipe_reproduces_deepseek_v3_settings(tmp_path):
    """A V3-like base (4K, 15360 sequences per step after V3's batch-size warmup, V3's schedule with its tails,
    so a final lr of 7.3e-6) extended 8x then 32x with s = 40 gets V3's configuration: the preset's rope_scaling,
    batches of 1920 and 480 from the first step, lr 7.3e-6."""
    v3 = ModelConfig.preset("deepseek-v3")
    base_model = v3.replace(rope_scaling_type=None, rope_factor=1.0, max_position_embeddings=4096)
    base = TrainConfig(preset="deepseek-v3", model_overrides={"rope_scaling_type": None, "rope_factor": 1.0,
                                                              "max_position_embeddings": 4096},
                       seq_len=4096, batch_size=3072, grad_accum=5, steps=1000, lr=2.2e-4, min_lr_ratio=0.1,
                       batch_warmup_start=3072, batch_warmup_tokens=469 * 10**9,  # V3: 3072 -> 15360 sequences
                       decay_start=10 / 14.8, decay_end=14.3 / 14.8, final_start=14.633 / 14.8,
                       final_lr_ratio=7.3e-6 / 2.2e-4, warmup_steps=10)
    stages = plan_stages(base, base_model, tmp_path, tmp_path / "base", [8, 32], steps=1000, factor=40)
    assert [(s.seq_len, s.config.batch_size * s.config.grad_accum) for s in stages] == [(32768, 1920),
                                                                                         (131072, 480)]
    for s in stages:
        assert s.config.lr == pytest.approx(7.3e-6) and s.config.steps == 1000
        assert s.config.batch_warmup_start is None  # the extension trains with the full batch from the start
        mc = ModelConfig.preset(s.config.preset).replace(**s.config.model_overrides)
        assert mc.to_hf()["rope_scaling"] == v3.to_hf()["rope_scaling"]
        assert mc.max_position_embeddings == 163840 and mc.softmax_scale == pytest.approx(0.13523, abs=5e-6)


def test_recipe_from_a_run_already_yarn_scaled(tmp_path):
    """A base trained at L = 128 whose model is itself YaRN-scaled from 64 (s = 2): the stages keep its original
    length, s = final length / 64, and s never drops below the run's own factor."""
    yarn_base = ModelConfig.preset("demo").replace(rope_scaling_type="yarn", rope_factor=2.0,
                                                   original_max_position_embeddings=64, max_position_embeddings=128)
    (stage,) = plan_stages(demo_base(), yarn_base, tmp_path, tmp_path / "base", [4])
    rope = stage.config.model_overrides
    assert (stage.seq_len, rope["original_max_position_embeddings"], rope["rope_factor"]) == (512, 64, 8.0)  # 512 / 64
    assert rope["max_position_embeddings"] == 512
    wide = yarn_base.replace(rope_factor=40.0, max_position_embeddings=2560)  # already good for 40 x 64 tokens
    (stage,) = plan_stages(demo_base(), wide, tmp_path, tmp_path / "base", [2])
    rope = stage.config.model_overrides
    assert (stage.seq_len, rope["rope_factor"], rope["max_position_embeddings"]) == (256, 40.0, 2560)  # not 256 / 64
    with pytest.raises(ValueError, match="--factor 8 is below 40"):
        plan_stages(demo_base(), wide, tmp_path, tmp_path / "base", [2], factor=8.0)


@pytest.mark.parametrize("multiples, factor, message", [
    ([4, 2], None, "longer than the one before: 2 x 128 = 256 is not above 512"),
    ([1], None, "1 x 128 = 128 is not above 128"),
    ([], None, "at least one stage"),
    ([4, 16], 8.0, "--factor 8 is below 16"),
    ([4, 16], float("inf"), "--factor must be a finite number, got inf"),
    ([4, 100000], None, "--stages: 100000 x 128 = 12800000 tokens is longer than the 1048576"),
])
def test_recipe_rejects_bad_stages(tmp_path, multiples, factor, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        plan_stages(demo_base(), ModelConfig.preset("demo"), tmp_path, tmp_path, multiples, factor=factor)


def test_extend_bad_input_is_one_line(tmp_path, capsys):
    assert main(["extend", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("\n") == 1
    (tmp_path / "notarun").mkdir()
    assert main(["extend", str(tmp_path / "notarun"), "--out", str(tmp_path / "o")]) == 2
    assert "not a nanoseek training run" in capsys.readouterr().err
    assert main(["eval-long", str(tmp_path / "nope")]) == 2
    assert "no such extension or run directory" in capsys.readouterr().err
    for flags, message in ((["--threads", "-1"], "--threads must be positive"), (["--device", "bogus"],
                                                                                  "invalid --device 'bogus'")):
        assert main(["eval-long", str(tmp_path / "notarun"), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("flag", ["--lengths", "--passkey-lengths"])
@pytest.mark.parametrize("value", ["abc", "0", "64,-1", ","])
def test_eval_long_bad_length_list_names_the_flag(tmp_path, capsys, flag, value):
    assert main(["eval-long", str(tmp_path), flag, value]) == 2
    err = capsys.readouterr().err
    assert f"{flag}: expected comma-separated positive integers, got {value!r}" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    """A tiny base run at 32 tokens, extended to 128 then 256 (2 steps per stage)."""
    from nanoseek.train.extend import extend

    root = tmp_path_factory.mktemp("long")
    cfg = TrainConfig(preset="tiny", model_overrides={"rope_scaling_type": None, "rope_factor": 1.0},
                      data=[STDLIB_JSON], vocab_size=300, seq_len=32, batch_size=8, steps=4, warmup_steps=1,
                      eval_every=2, eval_batches=1, save_every=4, dtype="fp32", threads=1,
                      cache_dir=str(root / "cache"), progress=False, report=False)
    train(cfg, root / "base", log=lambda s: None)
    # a start with other settings that failed before its first stage's checkpoint: its plan gives way
    (root / "ext").mkdir()
    (root / "ext" / "extend.json").write_text(json.dumps({"passkey_fraction": 0.5}))
    logs: list[str] = []
    extend(root / "base", root / "ext", [4, 8], steps=2, passkey_fraction=0.2, threads=1, progress=False,
           log=logs.append)
    return root, logs


def test_extend_threads_zero_is_an_error_as_in_train(extended):
    """--threads 0 is rejected as nanoseek train rejects it, not read as "the base run's"."""
    from nanoseek.train.extend import extend

    root, _ = extended
    with pytest.raises(ValueError, match="--threads must be positive, got 0"):
        extend(root / "base", root / "threads0", [4], steps=1, passkey_fraction=0.2, threads=0, progress=False,
               log=lambda s: None)
    assert not (root / "threads0").exists()  # rejected before anything is written (it used to leave extend.json)
    (root / "a-file").write_text("")
    with pytest.raises(ValueError, match="--out .*a-file exists and is not a directory"):
        extend(root / "base", root / "a-file", [4], steps=1, progress=False, log=lambda s: None)


def test_extend_out_and_the_base_run_must_not_hold_one_another(extended):
    """--out inside the base run, or an extension output holding the base (one of its own stages): a one-line
    error, and the extension is left as it was (with --overwrite, its plan used to be replaced by the new one and
    stage 1's start set aside the very run it was initialised from)."""
    from nanoseek.train.extend import extend

    root, _ = extended
    plan = (root / "ext" / "extend.json").read_text()
    for base, out, kw in ((root / "base", root / "base" / "long", {}),
                          (root / "ext" / "stage-1", root / "ext", {"overwrite": True})):
        with pytest.raises(ValueError, match="must not lie one inside the other"):
            extend(base, out, [2], steps=1, progress=False, log=lambda s: None, **kw)
    assert not (root / "base" / "long").exists()
    assert (root / "ext" / "extend.json").read_text() == plan


def test_extend_again_with_other_settings_names_the_setting(extended):
    """Running a started extension again with another --steps or --lr names steps or lr, not "stages"."""
    from nanoseek.train.extend import extend

    root, _ = extended
    for kw, changed in (({"steps": 3}, "(steps)"), ({"steps": 2, "lr": 1e-3}, "(lr)"),
                        ({"steps": 2, "passkey_fraction": 0.3}, "(passkey_fraction)")):
        with pytest.raises(ValueError, match=f"other settings {re.escape(changed)}: pass --overwrite"):
            extend(root / "base", root / "ext", [4, 8], progress=False, log=lambda s: None,
                   **{"passkey_fraction": 0.2, **kw})


def test_extend_again_resumes_a_stage_to_the_steps_its_time_budget_fitted(extended):
    """A stage whose --time-budget fitted it to fewer steps than the plan's, interrupted, is continued to its own
    (fitted) steps, as `nanoseek train --resume` would; it used to be trained on to the plan's --steps."""
    from nanoseek.train.extend import extend

    root, _ = extended
    out = root / "fitted"

    def stop_at_step_2(line):
        if line.startswith("step 2:"):  # validation at step 2, before its checkpoint: step 1 is saved
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extend(root / "base", out, [4], steps=6, passkey_fraction=0.2, progress=False, log=stop_at_step_2)
    stage = out / "stage-1"
    for path in (stage / "train_config.json", stage / "checkpoint" / "train_config.json"):  # as a fit leaves them
        path.write_text(json.dumps({**json.loads(path.read_text()), "steps": 3}))
    logs: list[str] = []
    extend(root / "base", out, [4], steps=6, passkey_fraction=0.2, progress=False, log=logs.append)
    assert json.loads((stage / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    assert any(line.startswith("stage 1: 3 steps of") for line in logs)
    assert logs[-1].startswith("extend: done")


def test_extend_a_stage_stopped_by_the_time_budget_is_not_reported_done(extended, monkeypatch):
    """A stage that the time budget stopped before its last step: extend says so and says to run it again,
    instead of "extend: done"."""
    import dataclasses

    from nanoseek.train import loop
    from nanoseek.train.extend import extend

    root, _ = extended
    real = loop.train
    monkeypatch.setattr(loop, "train", lambda *a, **k: dataclasses.replace(real(*a, **k), stopped_by="time_budget"))
    logs: list[str] = []
    extend(root / "base", root / "budget", [4], steps=1, passkey_fraction=0.2, progress=False, log=logs.append)
    assert "stage 1: stopped by the time budget at step 1; running the same command again continues it" in logs
    assert logs[-1].startswith("extend: stage 1 stopped by the time budget before its last step")


def test_extend_a_checkpoint_directory_names_its_run_not_resume(extended, capsys):
    """A run's checkpoint (RUN/checkpoint, RUN/checkpoints/step-N) is no run to extend: the error names the run
    to extend instead (it used to say "resume the run with --resume RUN", an option extend does not have)."""
    root, _ = extended
    for ckpt in (root / "base" / "checkpoint", root / "base" / "checkpoints" / "step-00000004"):
        assert main(["extend", str(ckpt), "--out", str(root / "from-ckpt")]) == 2
        err = capsys.readouterr().err
        assert err == (f"nanoseek extend: error: {ckpt} is a checkpoint of the run {root / 'base'}, not a run: "
                       f"extend the run ({root / 'base'}), which extends its last checkpoint\n")
    assert not (root / "from-ckpt").exists()


def test_extend_again_over_a_damaged_plan_is_one_line(extended):
    from nanoseek.train.extend import extend

    root, _ = extended
    ext = root / "damaged-plan"
    shutil.copytree(root / "ext", ext, symlinks=True)
    for text, message in (("[]", "extend.json must hold a JSON object, got list"),
                          ("not json", "extend.json is not valid JSON")):
        (ext / "extend.json").write_text(text)
        with pytest.raises(ValueError, match=message):  # "[]" used to be an AttributeError traceback
            extend(root / "base", ext, [4, 8], steps=2, passkey_fraction=0.2, progress=False, log=lambda s: None)


def test_extend_interrupted_overwrite_continues_without_keeping_stale_later_stages(extended, monkeypatch, capsys):
    """An `extend --overwrite` interrupted in stage 1 leaves the old stage 2 (trained from the old stage 1) in
    place. Run again without --overwrite (as the interruption message now says: with it, every stage would
    start again), stage 1 is resumed and stage 2 starts again from it; the old stage 2 used to be taken for
    finished."""
    from nanoseek.train import extend as extend_mod

    root, _ = extended
    out = root / "redo"
    kw = dict(steps=3, passkey_fraction=0.2, progress=False)
    extend_mod.extend(root / "base", out, [4, 8], log=lambda s: None, **{**kw, "steps": 2})  # then redone with 3

    def stop_in_stage_1(line):
        if line.startswith("step 1:"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extend_mod.extend(root / "base", out, [4, 8], overwrite=True, log=stop_in_stage_1, **kw)
    logs: list[str] = []
    extend_mod.extend(root / "base", out, [4, 8], log=logs.append, **kw)
    assert not any("already finished" in line for line in logs)
    assert any(line.startswith("resumed") and "stage-1" in line for line in logs)
    assert any(line.startswith("stage 2: 3 steps of") for line in logs)  # trained again, from the new stage 1
    assert json.loads((out / "stage-2" / "checkpoint" / "trainer_state.json").read_text())["step"] == 3

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(extend_mod, "extend", interrupted)
    for flags, again in (([], "run the same command again"), (["--overwrite"], "run the same command without "
                                                                                "--overwrite again")):
        assert main(["extend", str(root / "base"), "--out", str(out), *flags]) == 130
        assert capsys.readouterr().err == f"\nnanoseek extend: interrupted; {again} to continue\n"


def test_extend_end_to_end_checkpoints_transformers_reads_as_yarn(extended):
    transformers = pytest.importorskip("transformers")
    from nanoseek.hf import load_pretrained

    root, logs = extended
    assert any("passkey examples are" in line for line in logs)  # the window alignment was checked
    for k, length in ((1, 128), (2, 256)):
        run = root / "ext" / f"stage-{k}"
        saved = TrainConfig.load(run / "train_config.json")
        assert saved.seq_len == length and saved.init_from.endswith("base" if k == 1 else "stage-1")
        hf = json.loads((run / "config.json").read_text())
        assert hf["rope_scaling"] == {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
        theirs = transformers.DeepseekV3Config(**hf)
        assert theirs.rope_parameters["rope_type"] == "yarn" and theirs.rope_parameters["factor"] == 8.0
        assert theirs.rope_parameters["original_max_position_embeddings"] == 32
        assert theirs.max_position_embeddings == 256  # = factor x original: transformers' implicit factor agrees
    final = load_pretrained(root / "ext" / "final")
    assert final.config.yarn and final.config.rope_factor == 8.0


def test_init_from_copies_the_weights_and_checks_the_architecture(extended):
    from nanoseek.hf import load_pretrained
    from nanoseek.train.build import initialize_from

    root, _ = extended
    base = load_pretrained(root / "base")
    model = DeepSeekV3(ModelConfig.from_hf(root / "ext" / "stage-2"))
    initialize_from(model, root / "base")
    for (name, a), b in zip(base.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(model.rotary.inv_freq, base.rotary.inv_freq)  # YaRN frequencies, from the config
    other = DeepSeekV3(model.config.replace(hidden_size=32))
    with pytest.raises(ValueError, match="differs from this run's in hidden_size"):
        initialize_from(other, root / "base")


def test_init_from_trains_with_the_sources_tokenizer(extended):
    """A run started from another's weights tokenizes with that run's tokenizer unless told otherwise, even on
    another corpus; a different tokenizer of the same size is refused (its ids would mean other tokens)."""
    from nanoseek.train import tokenizer_train as tt
    from nanoseek.train.build import initialize_from

    root, _ = extended
    base = root / "base"
    cfg = TrainConfig.load(base / "train_config.json").replace(
        init_from=str(base), data=[str(Path(sysconfig.get_paths()["stdlib"]) / "email")], steps=1, eval_every=1,
        max_corpus_mb=0.05)
    train(cfg, root / "continued", log=lambda s: None)
    assert (root / "continued" / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    other = tt.train_bpe([(Path(sysconfig.get_paths()["stdlib"]) / "email" / "message.py").read_text()] * 3, 300)
    model = DeepSeekV3(ModelConfig.from_hf(base))
    initialize_from(model, base, tt.load_tokenizer(base))
    with pytest.raises(ValueError, match=r"its tokenizer differs from this run's \(\d+ of 300 tokens"):
        initialize_from(model, base, other)


def test_eval_long_base_length_is_the_same_for_a_run_its_extension_and_a_stage(extended, monkeypatch):
    from nanoseek.eval_long import subjects_of

    root, _ = extended
    stage = json.loads((root / "ext" / "extend.json").read_text())["stages"][0]["dir"]
    assert [subjects_of(d)[2] for d in (root / "base", root / "ext", root / "ext" / stage)] == [32, 32, 32]
    assert subjects_of(root / "ext" / "final")[2] == 32  # the link to the last stage too (it used to be 256)
    monkeypatch.chdir(root / "ext" / stage)
    subjects, _, L = subjects_of(Path("."))  # a run given as "." is labelled by its name (it used to be ", trained")
    assert subjects[0].label == f"{stage}, trained at 128" and L == 32
    # a base run whose own config has YaRN (original length 128) but trained at 32: extend's L is 32, so here too
    run = root / "yarn-run"
    run.mkdir(exist_ok=True)
    shutil.copy(root / "base" / "train_config.json", run)
    (run / "config.json").write_text(json.dumps(ModelConfig.preset("tiny").to_hf()))
    assert ModelConfig.from_hf(run).original_max_position_embeddings == 128 and subjects_of(run)[2] == 32


def test_eval_long_of_an_unfinished_extension(extended, capsys):
    """A stage without a checkpoint is a one-line error before any model is evaluated (it used to come after
    evaluating the base, as "no config.json at .../stage-2"); a stage short of its last step is labelled so."""
    from nanoseek.eval_long import subjects_of

    root, _ = extended
    ext = root / "unfinished"
    shutil.copytree(root / "ext", ext, symlinks=True)
    ckpt_config = ext / "stage-1" / "checkpoint" / "train_config.json"
    ckpt_config.write_text(json.dumps({**json.loads(ckpt_config.read_text()), "steps": 5}))
    labels = [s.label for s in subjects_of(ext)[0]]
    assert labels[2] == "(c1) stage 1, trained at 128 (unfinished: step 2 of 5)"
    assert labels[3] == "(c2) stage 2, trained at 256"
    shutil.rmtree(ext / "stage-2")
    assert main(["eval-long", str(ext), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == (f"nanoseek eval-long: error: {ext}: the extension is unfinished (stage-2 has no checkpoint): run "
                   "the same `nanoseek extend` command again to finish it\n")


def test_eval_long_again_without_passkeys_leaves_no_stale_heatmap(extended):
    root, _ = extended
    out = root / "eval-again"
    flags = ["--windows", "1", "--lengths", "32", "--passkey-lengths", "96", "--depths", "0.5", "--threads", "1",
             "--no-progress", "--out", str(out)]
    assert main(["eval-long", str(root / "base"), *flags, "--passkey-samples", "1"]) == 0
    assert (out / "passkey.png").is_file()
    assert main(["eval-long", str(root / "base"), *flags, "--passkey-samples", "0"]) == 0
    assert not (out / "passkey.png").exists()  # it used to stay, as if this evaluation had passkey results


def test_eval_long_of_a_damaged_plan_or_a_moved_base_is_one_line(extended, capsys):
    root, _ = extended
    ext = root / "damaged"
    shutil.copytree(root / "ext", ext, symlinks=True)
    plan = json.loads((ext / "extend.json").read_text())
    for edited, message in (({k: v for k, v in plan.items() if k != "base"}, "is not a `nanoseek extend` plan "
                                                                             "(KeyError: 'base')"),
                            ({**plan, "stages": []}, "is not a `nanoseek extend` plan (IndexError"),
                            ({**plan, "base": str(root / "gone")}, f"the extension's base run {root / 'gone'} does "
                                                                   "not exist")):
        (ext / "extend.json").write_text(json.dumps(edited))
        assert main(["eval-long", str(ext), "--no-progress"]) == 2  # a traceback (KeyError) used to end it
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_eval_long_notes_passkey_lengths_past_max_position_embeddings(extended, capsys):
    """The note on evaluating past max_position_embeddings (512 for the tiny base) counts the passkey examples,
    not only the loss windows (64 tokens here): it used to stay silent for a 1024-token passkey example."""
    root, _ = extended
    assert main(["eval-long", str(root / "base"), "--windows", "1", "--lengths", "64", "--passkey-lengths", "1024",
                 "--depths", "0.5", "--passkey-samples", "1", "--threads", "1", "--no-progress", "--out",
                 str(root / "eval-past")]) == 0
    assert "evaluating past its max_position_embeddings (512) up to 1024 tokens" in capsys.readouterr().err


def test_eval_long_skips_default_passkey_lengths_too_short_but_not_given_ones(extended, capsys):
    root, _ = extended
    flags = ["--windows", "1", "--passkey-samples", "1", "--lengths", "32", "--depths", "0.5", "--threads", "1",
             "--no-progress", "--out", str(root / "eval-defaults")]
    assert main(["eval-long", str(root / "base"), *flags]) == 0  # defaults: L = 32, 64, ..., 16L = 512
    err = capsys.readouterr().err
    assert "note: passkey lengths 32" in err and "skipped: too short for a passkey example" in err
    results = json.loads((root / "eval-defaults" / "results.json").read_text())
    assert 32 not in results["passkey_lengths"] and results["passkey_lengths"][-1] == 512
    assert list(results["models"][0]["passkey"]) == [str(n) for n in results["passkey_lengths"]]
    results["passkey_lengths"], results["models"][0]["passkey"] = [], {}  # every default length skipped
    assert "Passkey accuracy" not in markdown_tables(results)
    assert main(["eval-long", str(root / "base"), *flags, "--passkey-lengths", "32,512"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the data's log lines
    assert last.startswith("nanoseek eval-long: error: --passkey-lengths: a passkey example needs at least")


def test_passkey_lengths_met_when_pad_words_open_an_empty_part(extended):
    """With the tiny run's tokenizer, a depth-0.5 example a few tokens above the minimum has at most one filler
    word, so its head is empty and the pad words open it: the first pad takes 3 tokens (a word with no space
    before it, 2 tokens, and a line break of its own). Such lengths are met, not a ValueError (eval-long with 2
    examples per cell used to stop at 96 tokens: "could not build a passkey example of exactly 96 tokens")."""
    from nanoseek.train.tokenizer_train import load_tokenizer

    root, _ = extended
    maker = PasskeyMaker(load_tokenizer(root / "base" / "tokenizer.json"))
    e = maker.make(96, 0.5, "70458", phase=18)  # what eval-long met first (EVAL_SEED's 4th example at 96)
    assert len(e.ids) + 2 == 96 and e.text.split("\n")[0].split() == [maker.pad] * 5
    for length in range(88, 101):
        for phase in range(0, 19, 3):
            try:
                e = maker.make(length, 0.5, "40719", phase=phase)
            except PasskeyTooShort:
                continue
            assert len(e.ids) + 2 == length


def test_eval_long_end_to_end(extended, capsys, monkeypatch):
    """Every model of an extension is evaluated and the outputs are written; the results' numbers are their
    raw data's: each loss at length n is the mean of loss_by_position over positions < n and each bucket [a, b)
    the mean over positions a..b-1 (recomputed here from the results' own 5-decimal curve, hence 1e-5), and each
    passkey cell the fraction of that (length, depth)'s examples scored correct. The tiny models get every key
    wrong, which any filter would average to 0, so the scorer's verdicts (still computed) are replaced by a
    pattern that differs by depth, length and model, and the cells are recomputed from that pattern."""
    from nanoseek import eval_long

    calls: list[tuple[list[PasskeyExample], list[bool]]] = []  # per model, in order: its examples and verdicts

    def scorer(model, examples, *args, **kwargs):
        real = passkey_correct(model, examples, *args, **kwargs)
        assert len(real) == len(examples) and all(isinstance(c, bool) for c in real)
        k = len(calls)  # (a), (b), (c1), (c2): each flips its own example
        verdicts = [(e.depth == 1.0 or (e.length == 128 and i % 2 == 0)) != (i == k) for i, e in enumerate(examples)]
        calls.append((examples, verdicts))
        return verdicts

    monkeypatch.setattr(eval_long, "passkey_correct", scorer)
    root, _ = extended
    out = root / "eval"
    assert main(["eval-long", str(root / "ext"), "--windows", "2", "--passkey-samples", "2", "--lengths",
                 "32,64,256", "--passkey-lengths", "96,128", "--depths", "0,0.5,1", "--threads", "1",
                 "--no-progress", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    labels = [m["label"] for m in results["models"]]
    assert len(labels) == 4 and labels[1].startswith("(b) base + YaRN s=8")
    assert len(calls) == 4
    for m, (examples, verdicts) in zip(results["models"], calls):
        assert len(m["loss_by_position"]) == 256 and set(m["loss_at_length"]) == {"32", "64", "256"}
        assert list(m["loss_by_bucket"]) == ["0-32", "32-64", "64-128", "128-256"]
        assert set(m["passkey"]) == {"96", "128"} and set(m["passkey"]["96"]) == {"0", "0.5", "1"}
        curve = m["loss_by_position"]
        for n in (32, 64, 256):
            assert m["loss_at_length"][str(n)] == pytest.approx(sum(curve[:n]) / n, abs=1e-5, rel=0)
        for a, b in ((0, 32), (32, 64), (64, 128), (128, 256)):
            assert m["loss_by_bucket"][f"{a}-{b}"] == pytest.approx(sum(curve[a:b]) / (b - a), abs=1e-5, rel=0)
        cells: dict[tuple[str, str], list[bool]] = {}
        for e, v in zip(examples, verdicts):
            cells.setdefault((str(e.length), f"{e.depth:g}"), []).append(v)
        assert sorted(cells) == sorted((n, d) for n in ("96", "128") for d in ("0", "0.5", "1"))
        assert all(len(v) == 2 for v in cells.values())  # --passkey-samples 2 per (length, depth)
        assert m["passkey"] == {
            n: {d: sum(v) / len(v) for (n2, d), v in cells.items() if n2 == n} for n in ("96", "128")}
        assert m["passkey_overall"] == sum(verdicts) / len(verdicts)
    # the pattern tells depths and lengths apart: (a) flips example 0 (length 96, depth 0), (c2) example 3
    assert results["models"][0]["passkey"] == {"96": {"0": 0.5, "0.5": 0.0, "1": 1.0},
                                               "128": {"0": 0.5, "0.5": 0.5, "1": 1.0}}
    assert results["models"][3]["passkey"]["96"] == {"0": 0.0, "0.5": 0.5, "1": 1.0}
    assert results["models"][1]["rope"]["rope_scaling_type"] == "yarn"
    assert results["models"][0]["rope"]["rope_scaling_type"] is None
    for png in ("loss_by_position.png", "passkey.png"):
        assert (out / png).stat().st_size > 1000
    assert "Passkey accuracy" in capsys.readouterr().out


def test_extend_shows_progress_while_it_makes_the_passkey_examples(extended, monkeypatch):
    """Making a stage's passkey examples takes ~0.5 s each at 16K-32K tokens: with progress on, a bar says so (the
    step was silent for half a minute)."""
    import tqdm.auto

    from nanoseek.train.extend import extend

    root, _ = extended
    bars: list[tuple[str, bool]] = []
    real = tqdm.auto.tqdm

    def recording(*args, **kwargs):
        bars.append((kwargs.get("desc"), kwargs.get("disable", False)))
        return real(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", recording)
    # another passkey fraction: a corpus not cached by the fixture's run
    extend(root / "base", root / "progress", [4], steps=1, passkey_fraction=0.3, threads=1, progress=True,
           log=lambda s: None)
    assert ("stage 1: passkey examples", False) in bars
