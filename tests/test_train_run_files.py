"""What a training run writes, checked against values computed independently: the validation loss on the held-out
split, the checkpoints --keep-checkpoints keeps (and that an older one resumes), the global RNG state a resume
restores, the report's summary.json against metrics.jsonl, and the report's values for a hand-written run."""

import json
import math
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanoseek.hf import load_pretrained
from nanoseek.train import TrainConfig, resume_config, train
from nanoseek.train import checkpoint as ckpt_io
from nanoseek.train import loop
from nanoseek.train.data import PackedSequences, prepare_data, validation_batches
from nanoseek.train.metrics import of_type, read_metrics
from nanoseek.train.report import write_report

from test_train_loop import cache, interrupted_at, losses, quiet, tiny  # noqa: F401  (cache: a fixture)


@pytest.fixture(scope="module")
def run24(tmp_path_factory, cache):  # noqa: F811
    """A finished 24-step run validated at steps 8, 16 and 24 (more than the report's 20-step tail)."""
    run = tmp_path_factory.mktemp("run24") / "run"
    train(tiny(cache, steps=24, eval_every=8, save_every=12), run, log=quiet)
    return run


# ---------------------------------------------------------------------------------------------- validation
def test_validation_loss_is_the_loss_on_the_held_out_split(run24):
    """The logged val_loss at step 24 is the main head's mean cross-entropy, computed here with the step-24
    checkpoint, on the validation split's windows (contiguous slices of the val token stream, never the train
    stream); val_tokens and the depth-1 MTP loss agree too."""
    cfg = TrainConfig.from_dict(json.loads((run24 / ckpt_io.CONFIG_FILE).read_text()))
    data = prepare_data(cfg, tokenizer_path=run24 / "tokenizer.json", log=quiet)
    val_tokens = np.asarray(data.val.tokens(), dtype=np.int64)
    seqs = PackedSequences(val_tokens, cfg.seq_len)
    batches = validation_batches(seqs, cfg.batch_size, cfg.eval_batches)
    windows = torch.cat(batches)  # (n, seq_len + 1)
    assert len(windows) == cfg.batch_size * cfg.eval_batches
    train_tokens = np.asarray(data.train.tokens(), dtype=np.int64)
    for w in windows.numpy():
        starts = np.flatnonzero(val_tokens[: len(val_tokens) - cfg.seq_len] == w[0])
        assert any((val_tokens[s: s + cfg.seq_len + 1] == w).all() for s in starts)
        assert not any((train_tokens[s: s + cfg.seq_len + 1] == w).all()
                       for s in np.flatnonzero(train_tokens[: len(train_tokens) - cfg.seq_len] == w[0]))

    assert ckpt_io.current_checkpoint(run24).name == "step-00000024"
    model = load_pretrained(run24).eval()
    inputs, labels = windows[:, :-1], windows[:, 1:]
    with torch.no_grad():
        out = model.forward_train(inputs)
        main = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), reduction="mean").item()
        depth1 = F.cross_entropy(out.mtp_logits[0].flatten(0, 1), labels[:, 1:].flatten(), reduction="mean").item()
    val = of_type(read_metrics(run24 / "metrics.jsonl"), "val")
    last = val[-1]
    assert [v["step"] for v in val] == [8, 16, 24]
    assert last["val_tokens"] == labels.numel()
    assert last["val_loss"] == pytest.approx(main, rel=1e-5)
    assert last["val_mtp_losses"][0] == pytest.approx(depth1, rel=1e-5)
    # MaxVio_global: (max - mean) / mean of each MoE layer's counts over all the validation windows
    counts = out.expert_counts.double()
    maxvio = ((counts.amax(-1) - counts.mean(-1)) / counts.mean(-1)).tolist()
    assert last["maxvio_global"] == pytest.approx(maxvio, abs=1e-5)
    assert last["maxvio_global_mean"] == pytest.approx(sum(maxvio) / len(maxvio), rel=1e-6)
    # the same model on training windows scores differently: the check above can tell the splits apart
    train_batch = validation_batches(data.train_sequences(cfg.seq_len), cfg.batch_size, cfg.eval_batches)
    with torch.no_grad():
        tw = torch.cat(train_batch)
        other = F.cross_entropy(model(tw[:, :-1]).flatten(0, 1), tw[:, 1:].flatten()).item()
    assert abs(other - main) > 1e-3


# ---------------------------------------------------------------------------------------------- the report
def test_summary_json_is_computed_from_metrics_jsonl(run24):
    """Every computed field of summary.json, recomputed by hand from metrics.jsonl: the train-loss, MTP and
    MaxVio_batch means over the last 20 logged steps (24 were logged), the median throughput (first step left
    out), the last and best validation records, how the run ended."""
    write_report(run24, sample=False, log=quiet)
    s = json.loads((run24 / "summary.json").read_text())
    records = read_metrics(run24 / "metrics.jsonl")
    tr, val = of_type(records, "train"), of_type(records, "val")
    assert len(tr) == 24
    tail = tr[4:]  # the last 20
    assert s["steps"] == 24 and s["planned_steps"] == 24 and s["tokens"] == 24 * 4 * 32
    assert s["elapsed_s"] == tr[-1]["elapsed"] and s["skipped_steps"] == 0
    assert s["train_loss"] == pytest.approx(sum(r["main_loss"] for r in tail) / 20, rel=1e-12)
    assert s["train_loss"] != pytest.approx(sum(r["main_loss"] for r in tr[:20]) / 20, rel=1e-6)  # tail matters
    assert s["train_mtp_losses"] == [pytest.approx(sum(r["mtp_losses"][0] for r in tail) / 20, rel=1e-12)]
    assert s["maxvio_batch_mean"] == pytest.approx(sum(r["maxvio_batch_mean"] for r in tail) / 20, rel=1e-12)
    speeds = sorted(r["tokens_per_s"] for r in tr[1:])  # 23 values: the median is the 12th
    assert s["tokens_per_s"] == pytest.approx(speeds[11], rel=1e-12)
    assert s["val_step"] == 24 and s["val_loss"] == val[-1]["val_loss"] and s["val_ppl"] == val[-1]["val_ppl"]
    assert s["val_mtp_losses"] == val[-1]["val_mtp_losses"]
    assert s["maxvio_global"] == val[-1]["maxvio_global"]
    assert s["maxvio_global_mean"] == val[-1]["maxvio_global_mean"]
    assert s["best_val_loss"] == min(v["val_loss"] for v in val)
    assert s["unigram_val_loss"] == json.loads((run24 / "data.json").read_text())["unigram_val_loss"]
    assert s["stopped_by"] == "done"


def test_report_values_of_a_hand_written_run(tmp_path, monkeypatch):
    """report.md, summary.json and the expert-load plot of a hand-written 3-step run whose step 2 was skipped
    (NaN), each value by hand: the train loss is the good steps' mean, the skipped step counted, the unigram
    row (its perplexity e^3, the validation loss 0.5 below it), and each expert's load per step relative to its
    layer's mean (the plotted array, captured), the skipped step left out."""
    import matplotlib.axes

    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps({"preset": "tiny", "steps": 3, "batch_size": 2, "grad_accum": 1,
                                                      "seq_len": 8, "balance": "bias", "dtype": "fp32", "lr": 1e-3}))
    (run / "data.json").write_text(json.dumps({"sources": ["corpus"], "skipped": {"binary": 2, "empty": 1},
                                              "unigram_val_loss": 3.0}))
    counts = {1: [[1, 3, 2, 2], [4, 0, 2, 2]], 2: [[8, 0, 0, 0], [8, 0, 0, 0]], 3: [[0, 0, 6, 2], [1, 1, 1, 5]]}
    records = [{"type": "event", "step": 0, "event": "start", "params": 1000,
                "model": {"num_hidden_layers": 3, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0}}]
    for step, loss in ((1, 4.0), (2, "nan"), (3, 2.0)):
        records.append({"type": "train", "step": step, "tokens": 16 * step, "loss": loss, "main_loss": loss,
                        "lr": 1e-3, "tokens_per_s": 100.0, "elapsed": float(step), "skipped": step == 2,
                        "expert_counts": counts[step]})
    records += [{"type": "val", "step": 3, "tokens": 48, "val_loss": 2.5, "val_ppl": math.exp(2.5)},
                {"type": "event", "step": 3, "event": "done", "message": "finished"}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    shown = []
    real = matplotlib.axes.Axes.imshow
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", lambda ax, img, **kw: shown.append(img) or real(ax, img, **kw))

    text = write_report(run, sample=False, log=quiet).read_text()
    s = json.loads((run / "summary.json").read_text())
    assert (s["steps"], s["skipped_steps"], s["train_loss"], s["val_loss"]) == (3, 1, 3.0, 2.5)
    assert "| steps | 3 of 3 (done); 1 skipped (NaN/inf) |" in text and "skipped 3 files (2 binary, 1 empty)" in text
    assert "| validation loss (step 3) | 2.5000 (perplexity 12.18) |" in text
    assert ("| unigram baseline on validation | 3.0000 (perplexity 20.1); the model's validation loss is 0.50 "
            "nats/token below it |") in text
    # per layer an (experts, steps) array: steps 1 and 3, each count over its layer's mean count (2)
    assert len(shown) == 2
    np.testing.assert_allclose(shown[0], [[0.5, 0.0], [1.5, 0.0], [1.0, 3.0], [1.0, 1.0]])
    np.testing.assert_allclose(shown[1], [[2.0, 0.5], [0.0, 0.5], [1.0, 0.5], [1.0, 2.5]])


def test_report_of_a_one_step_run_warns_nothing(tmp_path):
    """One logged step (--steps 1, or a run stopped after it): the expert-load plot spans that step instead of
    matplotlib warning about identical x limits in the command's output."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps({"preset": "tiny", "steps": 1, "batch_size": 2, "grad_accum": 1,
                                                      "seq_len": 8}))
    (run / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 1, "tokens": 16, "loss": 4.0,
                                                   "main_loss": 4.0, "lr": 1e-3, "tokens_per_s": 100.0,
                                                   "elapsed": 1.0, "expert_counts": [[1, 3, 2, 2]]}) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_report(run, sample=False, log=quiet)
    assert (run / "plots" / "expert_load.png").is_file()


def test_report_of_a_run_with_a_damaged_checkpoint_is_written_without_a_sample(tmp_path, cache):  # noqa: F811
    """The report is the run's metrics: a checkpoint that cannot be read costs the sample only, and says why."""
    run = tmp_path / "run"
    train(tiny(cache, steps=2, save_every=2, eval_every=2), run, log=quiet)
    (ckpt_io.current_checkpoint(run) / "model.safetensors").write_bytes(b"damaged")
    logs = []
    text = write_report(run, log=logs.append).read_text()
    assert "| steps | 2 of 2 (done) |" in text and "## Sample" not in text
    assert any(line.startswith("report: no sample (cannot read") for line in logs)


def test_report_of_an_interrupted_run_names_its_last_checkpoint(tmp_path, cache):  # noqa: F811
    """A run stopped at step 5 whose last checkpoint is step 3: the report says so (steps 4 and 5 are logged but
    their weights are lost; the sample and a resume start from step 3). A finished run's report does not."""
    run = tmp_path / "run"
    with interrupted_at(5), pytest.raises(KeyboardInterrupt):
        train(tiny(cache, steps=6, save_every=3), run, log=quiet)
    text = write_report(run, sample=False, log=quiet).read_text()
    assert "| steps | 5 of 6 (interrupted); last checkpoint at step 3 (" in text
    train(resume_config(run), run, resume=True, log=quiet)
    assert "last checkpoint" not in write_report(run, sample=False, log=quiet).read_text()


# ---------------------------------------------------------------------------------------------- --keep-checkpoints
def test_keep_checkpoints_keeps_the_newest_and_an_older_one_resumes(tmp_path, cache):  # noqa: F811
    """keep_checkpoints=2 with saves at steps 0, 2, 4, 6: exactly step-4 and step-6 remain (the current one is
    step 6). step-4 loads (with its own weights), and a copy of the run pointed at it resumes and logs the losses
    of the uninterrupted run for steps 5 and 6."""
    run = tmp_path / "run"
    cfg = tiny(cache, steps=6, save_every=2, eval_every=6, keep_checkpoints=2)
    train(cfg, run, log=quiet)
    assert sorted(d.name for d in (run / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    assert ckpt_io.current_checkpoint(run).name == "step-00000006"
    older, newest = load_pretrained(run / "checkpoints" / "step-00000004"), load_pretrained(run)
    assert not torch.equal(older.lm_head.weight, newest.lm_head.weight)
    assert json.loads((run / "checkpoints" / "step-00000004" / ckpt_io.STATE_FILE).read_text())["step"] == 4

    copy = tmp_path / "copy"
    shutil.copytree(run, copy, symlinks=True)
    os.remove(copy / ckpt_io.POINTER)
    os.symlink(f"{ckpt_io.CHECKPOINTS}/step-00000004", copy / ckpt_io.POINTER)
    assert ckpt_io.current_checkpoint(copy).name == "step-00000004"
    train(resume_config(copy), copy, resume=True, log=quiet)
    assert losses(copy) == losses(run) and [s for s, _ in losses(copy)] == [1, 2, 3, 4, 5, 6]
    assert sorted(d.name for d in (copy / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    assert torch.equal(load_pretrained(copy).lm_head.weight, newest.lm_head.weight)


# ---------------------------------------------------------------------------------------------- RNG on resume
def test_resume_restores_the_global_rng_state_saved_with_the_checkpoint(tmp_path, cache, monkeypatch):  # noqa: F811
    """Training draws nothing from torch's global RNG, so no loss shows whether a resume restored it: check the
    state itself. A run interrupted after its step-2 checkpoint, the global RNG then reseeded; at the first
    step of the resumed run, torch's global RNG state is the checkpoint's rng.torch_cpu (and draws the same
    numbers). The checkpoint saves only torch's RNG (no Python or numpy state): nothing in training uses them."""
    run = tmp_path / "run"
    cfg = tiny(cache, steps=4, save_every=2, eval_every=4)
    with interrupted_at(3), pytest.raises(KeyboardInterrupt):
        train(cfg, run, log=quiet)
    ckpt = ckpt_io.current_checkpoint(run)
    assert ckpt.name == "step-00000002"
    tensors = ckpt_io.load_training_tensors(ckpt)
    assert sorted(k for k in tensors if k.startswith("rng.")) == ["rng.torch_cpu"]
    saved = tensors["rng.torch_cpu"]
    expected_draw = torch.rand(8, generator=torch.Generator().set_state(saved))

    seen = []
    real_step = loop.Trainer._step

    def step(self, r):
        if not seen:
            state = torch.get_rng_state()
            seen.append((state, torch.rand(8)))
            torch.set_rng_state(state)  # the run goes on as it would have
        return real_step(self, r)

    monkeypatch.setattr(loop.Trainer, "_step", step)
    torch.manual_seed(12345)
    assert not torch.equal(torch.get_rng_state(), saved)
    train(resume_config(run), run, resume=True, log=quiet)
    assert len(seen) == 1
    state, draw = seen[0]
    assert torch.equal(state, saved)
    assert torch.equal(draw, expected_draw)
