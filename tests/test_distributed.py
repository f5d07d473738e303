"""Distributed training on 2-4 gloo CPU processes equals single-process training: the per-step losses of
5 steps (1e-5 relative) and the final checkpoint's weights and AdamW state, for EP=2, DP=2 (ZeRO-1: each DP
rank holds its share of the moments only), EP=2 x DP=2 and PP=2 (DualPipeV); a run resumes under another
layout; a dead or hung rank fails the job within the timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanoseek.distributed.spawn import run_spawned
from nanoseek.train.config import TrainConfig
from nanoseek.train.metrics import of_type, read_metrics

STDLIB_JSON = str(Path(sysconfig.get_paths()["stdlib"]) / "json")
STEPS = 5


def base_config(cache: Path, **kw) -> TrainConfig:
    # a constant schedule (no decay, no lambda/gamma switch) so that a run of 3 steps continued to 5 is the 5-step run;
    # eval_batches=7 takes the whole validation split, 50 sequences: batches of 8, ..., 8, 2, so that with 4 data
    # ranks two hold no row of the last one (they run one row and must count none of it)
    settings = dict(preset="tiny", model_overrides={"num_hidden_layers": 4}, data=[STDLIB_JSON], vocab_size=300,
                    seq_len=32, batch_size=8, steps=STEPS, warmup_steps=0, decay_start=1.0, mtp_lambda_switch=1.0,
                    bias_gamma_switch=1.0, bias_gamma=0.01, lr=2e-3, save_every=STEPS, eval_every=STEPS,
                    eval_batches=7, dtype="fp32", threads=1, progress=False, report=False, cache_dir=str(cache))
    settings.update(kw)
    return TrainConfig(**settings)


def quiet(_msg: str) -> None:
    pass


def _train_worker(rank: int, world: int, cfg_dict: dict, out: str, layout: tuple[int, int, int], schedule: str,
                  resume: bool) -> int:
    from nanoseek.distributed.mesh import Layout
    from nanoseek.distributed.train import ParallelSettings, train_distributed

    parallel = ParallelSettings(Layout(*layout), schedule=schedule, timeout_s=60)
    result = train_distributed(TrainConfig.from_dict(cfg_dict), out, parallel, resume=resume, log=quiet)
    return result.step if result is not None else -1


def _layout_worker(rank: int, world: int, cfg_dict: dict, out: str, layout: tuple[int, int, int], schedule: str,
                   resume: bool) -> tuple[int, dict]:
    """``_train_worker``, and where this rank stands in ZeRO-1: the AdamW moments it holds after the run
    (elements of ``exp_avg`` per parameter name) and all the parameters it trains."""
    import nanoseek.distributed.train as dist_train

    held = []

    class Recorded(dist_train.DistributedOptimizer):
        def __init__(self, named_params, cfg, ctx):
            super().__init__(named_params, cfg, ctx)
            held.append((self, named_params, ctx))

    dist_train.DistributedOptimizer = Recorded
    step = _train_worker(rank, world, cfg_dict, out, layout, schedule, resume)
    opt, named, ctx = held[-1]
    moments = {opt.names[id(p)]: s["exp_avg"].numel() for p, s in opt.local.state.items()}
    return step, {"coords": (ctx.pp_rank, ctx.ep_rank), "dp_rank": ctx.dp_rank, "moments": moments,
                  "params": {n: p.numel() for n, p in named}}


def losses(run: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["main_loss"]) for r in of_type(read_metrics(run / "metrics.jsonl"), "train")]


def logged_terms(run: Path, from_step: int) -> list[tuple]:
    """Per step: the logged loss terms besides the total and the main loss, and the tokens trained on so far."""
    return [(r["step"], r["mtp_loss"], r["balance_loss"], r["mtp_losses"], r["tokens"])
            for r in of_type(read_metrics(run / "metrics.jsonl"), "train") if r["step"] >= from_step]


def grad_norms(run: Path) -> list[float]:
    return [r["grad_norm"] for r in of_type(read_metrics(run / "metrics.jsonl"), "train")]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoint" / "model.safetensors"))


def optim_state(run: Path) -> dict[str, torch.Tensor]:
    """The AdamW state of the run's checkpoint, keyed ``optim.{parameter}.{step|exp_avg|exp_avg_sq}``."""
    return {k: v for k, v in load_file(str(run / "checkpoint" / "training_state.safetensors")).items()
            if k.startswith("optim.")}


def assert_same_optim_state(run: Path, ref: Path) -> None:
    """Every parameter's AdamW step and moments, as one process has them after the same steps: a moment lost
    or taken from the wrong ZeRO share, EP rank or stage fails (the losses would only show it on resume)."""
    got, want = optim_state(run), optim_state(ref)
    assert sorted(got) == sorted(want)
    for key, t in want.items():
        tol = 1e-4 * t.abs().max().item()  # measured: up to 2e-5 of the largest entry (summation order)
        torch.testing.assert_close(got[key], t, rtol=1e-4, atol=tol, msg=lambda m: f"{key}: {m}")


def assert_same_run(run: Path, ref: Path, from_step: int = 1) -> None:
    got = [x for x in losses(run) if x[0] >= from_step]
    want = [x for x in losses(ref) if x[0] >= from_step]
    assert [s for s, *_ in got] == [s for s, *_ in want] == list(range(from_step, STEPS + 1))
    for (s, loss, main), (_, loss_ref, main_ref) in zip(got, want):
        assert loss == pytest.approx(loss_ref, rel=1e-5), f"step {s}"
        assert main == pytest.approx(main_ref, rel=1e-5), f"step {s}"
    # the other logged terms (a term swapped, or averaged over the wrong number of ranks, leaves the total as it is;
    # the balance loss weighs 1e-4 in it) and the token count, which must count every data rank's rows
    got_terms, want_terms = logged_terms(run, from_step), logged_terms(ref, from_step)
    assert len(got_terms) == len(want_terms) == len(want)
    for (s, mtp, bal, depths, tokens), (_, mtp_ref, bal_ref, depths_ref, tokens_ref) in zip(got_terms, want_terms):
        assert mtp == pytest.approx(mtp_ref, rel=1e-5), f"step {s}"
        assert depths == pytest.approx(depths_ref, rel=1e-5), f"step {s}"
        assert bal == pytest.approx(bal_ref, rel=1e-5), f"step {s}"
        assert tokens == tokens_ref, f"step {s}"
    # the gradient itself (before clipping): AdamW and the clip hide a wrong scale from the losses and weights
    assert grad_norms(run)[from_step - 1:] == pytest.approx(grad_norms(ref)[from_step - 1:], rel=1e-4)
    w, w_ref = weights(run), weights(ref)
    assert w.keys() == w_ref.keys()
    for name in w_ref:
        torch.testing.assert_close(w[name], w_ref[name], rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from nanoseek.train.loop import train

    root = tmp_path_factory.mktemp("dist")
    cache = root / "cache"
    torch.set_num_threads(1)
    train(base_config(cache), root / "single", log=quiet)
    return root, cache


LAYOUTS = {  # name: ((ep, pp, dp), schedule)
    "ep2": ((2, 1, 1), "dualpipev"),
    "dp2_zero1": ((1, 1, 2), "dualpipev"),
    "ep2_dp2": ((2, 1, 2), "dualpipev"),
    "pp2_dualpipev": ((1, 2, 1), "dualpipev"),
    "pp2_1f1b_ep2": ((2, 2, 1), "1f1b"),
    "pp2_dualpipev_ep2": ((2, 2, 1), "dualpipev"),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_equals_single_process(reference, name):
    """The 5-step run under each layout: one process's losses, gradient norms, weights, AdamW state (gathered
    into the checkpoint from every rank), validation and expert counts; ZeRO-1's shares of the moments; the
    all-to-all rows of one dispatch per (token, EP rank)."""
    root, cache = reference
    layout, schedule = LAYOUTS[name]
    world = layout[0] * layout[1] * layout[2]
    out = root / name
    results = run_spawned(_layout_worker, world, base_config(cache).to_dict(), str(out), layout, schedule, False,
                          timeout_s=120)
    steps = [step for step, _ in results]
    assert steps[0] == STEPS and all(s == -1 for s in steps[1:])
    assert_zero_shares([zero for _, zero in results], layout[2])
    assert_same_run(out, root / "single")
    assert_same_optim_state(out, root / "single")
    metrics = read_metrics(out / "metrics.jsonl")
    assert of_type(metrics, "val"), "validation ran"
    val, val_ref = of_type(metrics, "val")[-1], of_type(read_metrics(root / "single" / "metrics.jsonl"), "val")[-1]
    assert val["val_loss"] == pytest.approx(val_ref["val_loss"], rel=1e-5)
    assert val["val_tokens"] == val_ref["val_tokens"] == 50 * 32  # summed over the data ranks, not averaged
    assert val["val_mtp_losses"] == pytest.approx(val_ref["val_mtp_losses"], rel=1e-5) and val["val_mtp_losses"]
    assert val["maxvio_global"] == pytest.approx(val_ref["maxvio_global"], abs=1e-4)
    single = of_type(read_metrics(root / "single" / "metrics.jsonl"), "train")
    assert of_type(metrics, "train")[-1]["expert_counts"] == single[-1]["expert_counts"]  # every layer, all ranks
    rec = of_type(metrics, "train")[-1]
    if layout[0] > 1:
        # each token goes once to each EP rank holding one of its 4 experts, and the tiny preset's routing (top-2
        # of 4 expert groups, 2 groups per rank) reaches at most 2 ranks: never one row per expert
        tokens = rec["a2a_tokens"]
        assert rec["a2a_slots"] == 4 * tokens
        assert 0 < rec["a2a_remote_rows"] < rec["a2a_rows"] and tokens < rec["a2a_rows"] <= 2 * tokens
    if layout[1] > 1 and schedule == "dualpipev":  # F&B pairs ran (in two threads when EP all-to-alls can overlap)
        assert rec["pp_fb_early_sends"] > 0
        assert (rec["pp_fb_threaded"] > 0) == (layout[0] > 1)


def assert_zero_shares(ranks: list[dict], dp: int) -> None:
    """ZeRO-1: the DP ranks of one (stage, EP rank) each hold the AdamW moments of their own parameters only,
    about 1/dp of the elements, the shares disjoint and together all the parameters; with DP=1 a rank holds
    them all."""
    places: dict[tuple, list[dict]] = {}
    for r in ranks:
        places.setdefault(r["coords"], []).append(r)
    for coords, peers in places.items():
        assert sorted(r["dp_rank"] for r in peers) == list(range(dp))
        params = peers[0]["params"]
        assert all(r["params"] == params for r in peers)
        held: dict[str, int] = {}
        for r in peers:
            assert not held.keys() & r["moments"].keys(), f"{coords}: a moment kept on two DP ranks"
            held.update(r["moments"])
            share = sum(r["moments"].values()) / sum(params.values())
            assert abs(share - 1 / dp) < 0.1 / dp, f"{coords} DP rank {r['dp_rank']} holds {share:.1%}"
        assert held == params, coords  # every parameter's moments, each of its full size


def _nan_worker(rank: int, world: int, cfg_dict: dict, out: str) -> str:
    from nanoseek.distributed.mesh import Layout
    from nanoseek.distributed.train import ParallelSettings, train_distributed
    from nanoseek.train.loop import TrainingError

    try:
        train_distributed(TrainConfig.from_dict(cfg_dict), out, ParallelSettings(Layout(1, 1, 2), timeout_s=60),
                          log=quiet)
    except TrainingError as e:
        return str(e)
    return "finished"


def test_a_nan_streak_keeps_the_last_good_checkpoint(reference):
    """As in one process: steps with a NaN/inf loss are skipped, logged, neither validated nor saved, and the
    run stops with the last good checkpoint current (here step 0: a huge learning rate ruins step 1's weights)."""
    root, cache = reference
    out = root / "dp2_nan"
    cfg = base_config(cache, lr=1e38, grad_clip=0.0, save_every=3, eval_every=3, steps=8)
    messages = run_spawned(_nan_worker, 2, cfg.to_dict(), str(out), timeout_s=120)
    assert all(m.startswith("stopped: the loss was NaN/inf in 3 consecutive steps") for m in messages)
    assert "(step-00000000) is intact" in messages[0]
    metrics = read_metrics(out / "metrics.jsonl")
    events = [r["event"] for r in of_type(metrics, "event")]
    assert events.count("nonfinite") == 3 and events[-1] == "stopped"
    assert not of_type(metrics, "val")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000000"]


@pytest.mark.parametrize("layout, schedule", [((1, 1, 2), "dualpipev"), ((1, 2, 1), "dualpipev"),
                                              ((1, 2, 1), "1f1b")])
def test_tied_embeddings_equal_single_process(reference, layout, schedule):
    from nanoseek.train.loop import train

    root, cache = reference
    cfg = base_config(cache, model_overrides={"num_hidden_layers": 4, "tie_word_embeddings": True})
    if not (root / "single_tied").exists():
        train(cfg, root / "single_tied", log=quiet)
    out = root / f"tied_{'x'.join(map(str, layout))}_{schedule}"
    run_spawned(_train_worker, 2, cfg.to_dict(), str(out), layout, schedule, False, timeout_s=120)
    assert_same_run(out, root / "single_tied")


@pytest.mark.parametrize("schedule", ["dualpipev", "zbv"])
def test_two_mtp_depths_in_a_zero_bubble_pipeline_equal_single_process(reference, schedule):
    from nanoseek.train.loop import train

    root, cache = reference
    cfg = base_config(cache, mtp_depth=2)
    if not (root / "single_mtp2").exists():
        train(cfg, root / "single_mtp2", log=quiet)
    out = root / f"mtp2_pp2_{schedule}"
    run_spawned(_train_worker, 2, cfg.to_dict(), str(out), (1, 2, 1), schedule, False, timeout_s=120)
    assert_same_run(out, root / "single_mtp2")


def test_a_collective_failure_is_found_behind_the_pipeline_wrapper():
    from nanoseek.distributed.train import _collective_failure

    try:
        try:
            raise RuntimeError("Connection closed by peer [127.0.0.1]:1234")
        except RuntimeError as e:
            raise RuntimeError("[Stage 1] failed to run forward") from e
    except RuntimeError as wrapped:
        assert str(_collective_failure(wrapped)).startswith("Connection closed by peer")
    assert _collective_failure(ValueError("a bad setting")) is None


def test_grad_accum_becomes_pipeline_microbatches(reference):
    """--grad-accum 2 (2 micro-batches of 4 sequences) is the run of one batch of 8: in one process, under PP=2
    (the accumulated micro-batches run as pipeline micro-batches) and under EP=2 (accumulated on each rank)."""
    from nanoseek.train.loop import train

    root, cache = reference
    cfg = base_config(cache, batch_size=4, grad_accum=2)
    train(cfg, root / "single_accum", log=quiet)
    assert_same_run(root / "single_accum", root / "single")
    for name, layout in (("pp2_accum", (1, 2, 1)), ("ep2_accum", (2, 1, 1))):
        run_spawned(_train_worker, 2, cfg.to_dict(), str(root / name), layout, "dualpipev", False, timeout_s=120)
        assert_same_run(root / name, root / "single")


def test_resume_under_another_layout(reference):
    """3 steps with EP=2, then 2 more in one process: the 5-step single-process run."""
    from nanoseek.train.loop import train

    root, cache = reference
    out = root / "ep2_then_single"
    run_spawned(_train_worker, 2, base_config(cache, steps=3, save_every=3).to_dict(), str(out), (2, 1, 1),
                "dualpipev", False, timeout_s=120)
    train(base_config(cache), out, resume=True, log=quiet)
    assert_same_run(out, root / "single")


def test_torchrun_cli_equals_single_process(reference):
    """The real launcher: torchrun -m nanoseek train --ep 2, with the reference run's settings as flags."""
    root, cache = reference
    out = root / "torchrun_ep2"
    flags = ["--preset", "tiny", "--model", "num_hidden_layers=4", "--data", STDLIB_JSON, "--vocab-size", "300",
             "--seq-len", "32", "--batch-size", "8", "--steps", str(STEPS), "--warmup-steps", "0", "--decay-start", "1",
             "--mtp-lambda-switch", "1", "--bias-gamma-switch", "1", "--bias-gamma", "0.01", "--lr", "2e-3",
             "--save-every", str(STEPS), "--eval-every", str(STEPS), "--eval-batches", "7", "--dtype", "fp32",
             "--threads", "1", "--no-progress", "--no-report", "--cache-dir", str(cache), "--out", str(out)]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "nanoseek", "train", "--ep", "2", "--dist-timeout", "60", *flags],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("distributed: EP=2 x PP=1 x DP=1") == 1  # rank 0 logs, rank 1 does not
    assert_same_run(out, root / "single")


def test_resume_from_a_pipeline_run_under_expert_and_zero_parallelism(reference):
    """3 steps with PP=2 (1F1B: the last rank holds a copy of the embedding), a 4th with EP=2 x DP=2 (ZeRO-1
    shards the loaded AdamW moments), then the 5th in one process (from the moments gathered from the ZeRO
    shares of every EP rank): the 5-step single-process run, its AdamW state included."""
    from nanoseek.train.loop import train

    root, cache = reference
    out = root / "pp2_then_ep2_dp2"
    run_spawned(_train_worker, 2, base_config(cache, steps=3, save_every=3).to_dict(), str(out), (1, 2, 1), "1f1b",
                False, timeout_s=120)
    run_spawned(_train_worker, 4, base_config(cache, steps=4, save_every=4).to_dict(), str(out), (2, 1, 2),
                "dualpipev", True, timeout_s=120)
    train(base_config(cache), out, resume=True, log=quiet)
    assert_same_run(out, root / "single")
    assert_same_optim_state(out, root / "single")


def _dying_worker(rank: int, world: int, cfg_dict: dict, out: str, mode: str) -> None:
    if rank == 1:
        if mode == "hang":
            time.sleep(8)
            return
        raise SystemExit(3)  # dies before its first collective
    _train_worker(rank, world, cfg_dict, out, (2, 1, 1), "dualpipev", False)


def test_compile_under_parallelism_is_refused(reference):
    """--compile is a single-process feature for now: under a layout it is an error, not silently eager."""
    root, cache = reference
    with pytest.raises(RuntimeError, match="--compile runs in one process only"):
        run_spawned(_train_worker, 2, base_config(cache, compile=True).to_dict(), str(root / "compiled"), (1, 1, 2),
                    "dualpipev", False, timeout_s=60)


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_dead_or_hung_rank_fails_the_job(reference, mode):
    root, cache = reference
    t0 = time.time()
    with pytest.raises(RuntimeError) as err:
        run_spawned(_dying_worker, 2, base_config(cache).to_dict(), str(root / f"fault_{mode}"), mode, timeout_s=4)
    text = str(err.value)
    assert "rank 0" in text and ("collective failed or timed out" in text or "Connection closed" in text), text[:2000]
    assert time.time() - t0 < 60


def _moe_worker(rank: int, world: int) -> dict:
    from nanoseek.distributed.expert_parallel import apply_expert_parallel

    moe, x = _moe_and_input()
    stats = apply_expert_parallel(moe, torch.distributed.group.WORLD)
    mine = x.detach()[rank::world].clone().requires_grad_(True)
    y, routing = moe(mine)
    (y.square().sum() + routing.scores.sum()).backward()
    out = {"y": y.detach(), "x_grad": mine.grad, "gate_up_grad": moe.experts.gate_up_proj.grad,
           "router_grad": moe.gate.weight.grad, "counts": routing.counts, "stats": stats.as_dict()}
    stats.reset()
    moe.gate.e_score_correction_bias.zero_()  # the router's own choice: tokens spread over both ranks
    with torch.no_grad():
        out["spread_idx"] = moe(mine)[1].topk_idx
    out["spread_stats"] = stats.as_dict()
    return out


def _moe_and_input():
    from nanoseek.config import ModelConfig
    from nanoseek.model.moe import MoE

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")  # 16 experts in 4 groups, top-4 within 2 groups
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.2)
    moe.gate.e_score_correction_bias[:8] = -100.0  # every token picks experts 8..15: EP rank 1 only
    return moe, torch.randn(4, 6, cfg.hidden_size, requires_grad=True)


@pytest.fixture(scope="module")
def moe_ep2():
    """One MoE layer under EP=2: what each rank of ``_moe_worker`` returns (one spawn for the tests below)."""
    return run_spawned(_moe_worker, 2, timeout_s=60)


def test_expert_parallel_layer_when_a_rank_receives_no_token(moe_ep2):
    """EP=2 forward and backward equal one process even when rank 0's experts get no token at all (its
    all-to-alls must still run in the backward)."""
    results = moe_ep2
    moe, x = _moe_and_input()
    grads = torch.zeros_like(moe.experts.gate_up_proj)
    for rank, res in enumerate(results):
        mine = x.detach()[rank::2].clone().requires_grad_(True)
        moe.zero_grad()
        y, routing = moe(mine)
        (y.square().sum() + routing.scores.sum()).backward()
        torch.testing.assert_close(res["y"], y.detach(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(res["x_grad"], mine.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(res["router_grad"], moe.gate.weight.grad, rtol=1e-4, atol=1e-4)
        assert torch.equal(res["counts"], routing.counts) and routing.counts[:8].sum() == 0
        grads += moe.experts.gate_up_proj.grad
    ep_grads = torch.cat([results[0]["gate_up_grad"] if results[0]["gate_up_grad"] is not None
                          else torch.zeros(8, *grads.shape[1:]), results[1]["gate_up_grad"]])
    torch.testing.assert_close(ep_grads, grads, rtol=1e-4, atol=1e-4)


def test_expert_parallel_dispatch_sends_a_token_once_per_rank(moe_ep2):
    """The dispatch statistics of the EP=2 layer above against its routing counted by hand: one row per
    (token, rank holding one of its 4 experts), not one per expert, and at most 2 ranks per token (the tiny
    preset's top-2 of 4 expert groups, 2 groups per rank), a bound the router's own choice reaches."""
    for rank, res in enumerate(moe_ep2):
        st = res["stats"]  # every token's 4 experts on rank 1: one row each, to rank 1
        assert st["a2a_tokens"] == 12 and st["a2a_slots"] == 48 and st["a2a_rows"] == 12
        assert st["a2a_remote_rows"] == (12 if rank == 0 else 0) and st["a2a_max_ranks_per_token"] == 1
        idx = res["spread_idx"].reshape(-1, 4)  # (T, K) experts; rank = expert // 8
        ranks_per_token = [len(set((row // 8).tolist())) for row in idx]
        st = res["spread_stats"]
        assert st["a2a_rows"] == sum(ranks_per_token) < st["a2a_slots"] == 4 * len(idx)
        assert st["a2a_remote_rows"] == sum(int((row // 8 != rank).any()) for row in idx)
        assert st["a2a_max_ranks_per_token"] == max(ranks_per_token) == 2  # the bound, reached
        assert 1 in ranks_per_token  # and tokens on one rank only: the rows are counted, not bounded


def _bf16_moe_worker(rank: int, world: int) -> dict:
    import nanoseek.devices
    import nanoseek.distributed.expert_parallel as ep

    nanoseek.devices.native_bf16 = lambda device: True  # padding is for native bf16 products (experts.PAD_ROWS)

    moe, x = _bf16_moe_and_input()
    ep.apply_expert_parallel(moe, torch.distributed.group.WORLD)
    groups = []
    real = ep.expert_ffn
    ep.expert_ffn = lambda x_SD, counts, *w: groups.append(counts.tolist()) or real(x_SD, counts, *w)
    mine = x.detach()[rank::world].clone().requires_grad_(True)
    y, routing = moe(mine)
    y.float().square().sum().backward()
    return {"y": y.detach(), "x_grad": mine.grad, "groups": groups, "counts": routing.counts}


def _bf16_moe_and_input():
    from nanoseek.config import ModelConfig
    from nanoseek.model.moe import MoE

    torch.manual_seed(0)
    moe = MoE(ModelConfig.preset("tiny"))  # 16 experts: 8 per rank at EP=2
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.2)
    return moe.to(torch.bfloat16), torch.randn(2, 160, moe.experts.gate_up_proj.shape[-1], dtype=torch.bfloat16)


def test_expert_parallel_bf16_pads_each_experts_rows_like_one_process(monkeypatch):
    """bf16 on a CPU with native bf16 products and enough rows: each rank pads its experts' rows to multiples of
    32 (experts.PAD_ROWS), as one process does, and EP=2 gives one process's output and input gradient."""
    from nanoseek.model.experts import padded_counts

    monkeypatch.setattr("nanoseek.devices.native_bf16", lambda device: True)

    results = run_spawned(_bf16_moe_worker, 2, timeout_s=60)
    moe, x = _bf16_moe_and_input()
    for rank, res in enumerate(results):
        (groups,) = res["groups"]
        assert all(c % 32 == 0 for c in groups) and sum(groups) > 0
        mine = x.detach()[rank::2].clone().requires_grad_(True)
        y, routing = moe(mine)
        y.float().square().sum().backward()
        assert torch.equal(res["counts"], routing.counts)
        torch.testing.assert_close(res["y"].float(), y.float(), rtol=2e-2, atol=2e-2 * y.abs().max().item())
        torch.testing.assert_close(res["x_grad"].float(), mine.grad.float(), rtol=2e-2,
                                   atol=2e-2 * mine.grad.abs().max().item())
    loads = results[0]["counts"] + results[1]["counts"]  # every token's slots, per expert
    for rank, res in enumerate(results):
        assert res["groups"][0] == padded_counts(loads[8 * rank: 8 * rank + 8]).tolist()


def test_layout_errors():
    import dataclasses

    from nanoseek.config import ModelConfig
    from nanoseek.distributed.mesh import Layout

    with pytest.raises(ValueError, match="= 4 ranks, but the job has 2"):
        Layout(ep=2, dp=2).validate(2)
    with pytest.raises(ValueError, match=r"= 1 rank, but the job has 2 .*: give the layout, e.g. --dp 2$"):
        Layout().validate(2)  # torchrun without layout flags
    with pytest.raises(ValueError, match="does not divide the model's 16 routed experts"):
        Layout(ep=3).validate(3, ModelConfig.preset("tiny"))
    with pytest.raises(ValueError, match="--pp must be a positive integer"):
        Layout(pp=0).validate(0)
    dense = dataclasses.replace(ModelConfig.preset("tiny"), first_k_dense_replace=3, num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="--ep 2: the model has no MoE layer, no routed experts to split"):
        Layout(ep=2).validate(2, dense)


def test_metrics_list_moe_layers_in_model_order_past_ten_layers(tmp_path):
    """The train record's expert counts (gathered by name from the pipeline ranks) are stacked in the model's
    layer order, as one process logs them: layers.2 before layers.10 (a plain sort of the names would not),
    then the MTP blocks; MaxVio per layer follows the same order."""
    from nanoseek.distributed.mesh import Layout
    from nanoseek.distributed.train import DistributedTrainer, ParallelSettings
    from nanoseek.train.run_state import Progress

    trainer = DistributedTrainer(base_config(tmp_path), tmp_path / "run", ParallelSettings(Layout(pp=2)))
    names = [f"layers.{i}.mlp" for i in range(1, 12)] + ["mtp.0.block.mlp"]
    # layer number i: i tokens on expert 0, 1 on each of the 3 others (the MTP block: 12); MaxVio = (i - m) / m
    counts = {n: torch.tensor([i, 1, 1, 1]) for i, n in enumerate(names, start=1)}
    shuffled = {n: counts[n] for n in sorted(names)}  # the order a gather over the ranks may give
    rec = trainer._record(Progress(step=1), torch.zeros(5, dtype=torch.float64), 1e-3, 0.3, 0.01, 1e-4, 1.0, 1.0, 256,
                          shuffled, None)
    assert rec["expert_counts"] == [[i, 1, 1, 1] for i in range(1, 13)]
    assert rec["maxvio_batch"] == pytest.approx([(i - (i + 3) / 4) / ((i + 3) / 4) for i in range(1, 13)], abs=1e-5)


def test_node_limit_note_bounds_the_ranks_a_token_reaches():
    """The logged bound on the EP ranks a token reaches: topk_group groups, at most one rank each, and never more
    than the EP ranks there are."""
    from nanoseek.distributed.expert_parallel import node_limit_note

    assert node_limit_note(4, 2, "noaux_tc", 2).endswith("a token reaches at most 2 ranks (node-limited routing)")
    assert node_limit_note(8, 4, "noaux_tc", 8) == ("8 expert groups on 8 EP ranks (1 per rank): a token reaches at "
                                                   "most 4 ranks (node-limited routing)")  # V3: 4 nodes
    assert node_limit_note(8, 4, "noaux_tc", 2) == ("8 expert groups on 2 EP ranks (4 per rank): a token reaches at "
                                                   "most 2 ranks (node-limited routing)")  # 4 groups, 2 ranks
    assert node_limit_note(8, 4, "greedy", 2) == "no group limit: a token may reach all 2 EP ranks"
    assert node_limit_note(4, 4, "noaux_tc", 2) == "no group limit: a token may reach all 2 EP ranks"
    assert "do not map onto 3 EP ranks" in node_limit_note(4, 2, "noaux_tc", 3)


def test_cli_rejects_a_layout_that_does_not_match_the_world(tmp_path, capsys):
    from nanoseek.cli import main

    env = dict(os.environ)
    try:
        os.environ["WORLD_SIZE"] = "2"
        code = main(["train", "--preset", "tiny", "--ep", "4", "--out", str(tmp_path / "run")])
    finally:
        os.environ.clear()
        os.environ.update(env)
    assert code != 0
    assert "--ep 4 x --pp 1 x --dp 1 = 4 ranks, but the job has 2" in capsys.readouterr().err


def test_demo_under_torchrun_is_one_line(tmp_path, monkeypatch, capsys):
    from nanoseek.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("nanoseek demo: error: nanoseek demo runs in one process; under torchrun use nanoseek train "
                   "with --ep / --pp / --dp")


def test_an_error_every_rank_shares_is_printed_once(tmp_path):
    """torchrun, 2 ranks: every rank stops on the same bad flag (checked after the process group is up), rank 0
    alone prints it and the job fails."""
    flags = ["--preset", "tiny", "--data", STDLIB_JSON, "--vocab-size", "300", "--seq-len", "32", "--batch-size",
             "5", "--dp", "2", "--threads", "1", "--no-progress", "--cache-dir", str(tmp_path / "cache"),
             "--dist-timeout", "60", "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "nanoseek", "train", *flags], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nanoseek train: error:")]
    assert errors == ["nanoseek train: error: --batch-size 5 must be divisible by the 2 data-parallel ranks "
                      "(--dp 2 x --ep 1)"], proc.stderr[-3000:]


def test_an_error_one_rank_hits_is_printed_by_that_rank(tmp_path, monkeypatch, capsys):
    """Outside a torchrun agent (no wait for rank 0): rank 1 says an error, prefixed by its rank; rank 0 without
    one; both exit non-zero."""
    from nanoseek.cli import main
    from nanoseek.errors import report_error
    from nanoseek.train.loop import TrainingError

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    report_error("train", TrainingError("a collective failed or timed out", rank=1))
    assert capsys.readouterr().err == "nanoseek train: error: rank 1: a collective failed or timed out\n"
    own = FileNotFoundError("no tokenizer.json in /run")  # a read of its own (DistributedTrainer._own_errors)
    own.rank = 1
    report_error("train", own)
    assert capsys.readouterr().err == "nanoseek train: error: rank 1: no tokenizer.json in /run\n"
    # no torchrun agent to end this rank when rank 0 has said it: said again, with the rank (never lost)
    assert main(["train", "--preset", "tiny", "--ep", "4", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith("nanoseek train: error: rank 1: --ep 4 x --pp 1 x --dp 1 = 4 ranks")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--preset", "tiny", "--ep", "4", "--out", str(tmp_path / "run")]) == 2
    assert "--ep 4 x --pp 1 x --dp 1 = 4 ranks, but the job has 2" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")  # a RANK left in the environment of one process
    monkeypatch.setenv("RANK", "1")
    report_error("generate", FileNotFoundError("no checkpoint at /x"))
    assert capsys.readouterr().err == "nanoseek generate: error: no checkpoint at /x\n"


def test_microbatches_that_do_not_split_the_batch_fail_before_training(reference):
    root, cache = reference
    out = root / "bad_microbatches"
    with pytest.raises(RuntimeError, match="--microbatches 3: each data rank's 8 sequences"):
        run_spawned(_microbatch_worker, 2, base_config(cache).to_dict(), str(out), timeout_s=120)
    assert not (out / "checkpoints").exists()


def _microbatch_worker(rank: int, world: int, cfg_dict: dict, out: str) -> None:
    from nanoseek.distributed.mesh import Layout
    from nanoseek.distributed.train import ParallelSettings, train_distributed

    train_distributed(TrainConfig.from_dict(cfg_dict), out,
                      ParallelSettings(Layout(1, 2, 1), microbatches=3, timeout_s=60), log=quiet)


def test_batch_size_warmup_under_a_pipeline_equals_single_process(reference):
    """A batch-size warmup under PP=2 (DualPipeV): the warmup's steps run fewer pipeline micro-batches than the
    full steps, and the run equals one process's."""
    from nanoseek.train.loop import train

    root, cache = reference
    cfg = base_config(cache, batch_size=4, grad_accum=2, batch_warmup_start=4, batch_warmup_tokens=300)
    train(cfg, root / "single_warmup", log=quiet)
    single = of_type(read_metrics(root / "single_warmup" / "metrics.jsonl"), "train")
    assert [r["micro_batches"] for r in single] == [1, 1, 1, 2, 2]
    run_spawned(_train_worker, 2, cfg.to_dict(), str(root / "pp2_warmup"), (1, 2, 1), "dualpipev", False,
                timeout_s=120)
    assert_same_run(root / "pp2_warmup", root / "single_warmup")
    assert [r["micro_batches"] for r in of_type(read_metrics(root / "pp2_warmup" / "metrics.jsonl"), "train")] == \
        [1, 1, 1, 2, 2]


def test_fp8_products_under_expert_and_pipeline_parallelism(reference):
    """--dtype fp8 under EP=2 and under PP=2: each rank's products are FP8 too. Not equal to one process: a
    weight gradient's 128 x 1 tiles run along the rows a rank holds (V3's too), so the losses agree within FP8's
    rounding."""
    from nanoseek.train.loop import train

    root, cache = reference
    cfg = base_config(cache, dtype="fp8")
    train(cfg, root / "single_fp8", log=quiet)
    want = [loss for _, loss, _ in losses(root / "single_fp8")]
    fp32 = [loss for _, loss, _ in losses(root / "single")]  # the same run in fp32
    for name, layout in (("ep2_fp8", (2, 1, 1)), ("pp2_fp8", (1, 2, 1))):
        run_spawned(_train_worker, 2, cfg.to_dict(), str(root / name), layout, "dualpipev", False, timeout_s=120)
        got = [loss for _, loss, _ in losses(root / name)]
        assert got == pytest.approx(want, rel=2e-3), name
        # FP8 on the ranks: closer to one process in FP8 than to one in fp32
        assert max(abs(a - b) for a, b in zip(got, want)) < max(abs(a - b) for a, b in zip(got, fp32)), name


def test_a_run_in_use_stops_every_rank_with_that_cause(tmp_path):
    """A second job on a run directory another process trains in: rank 0 cannot take the run's lock, and every
    rank stops with that error (rank 1 used to wait for rank 0 and report a dead peer instead)."""
    from nanoseek.train.checkpoint import run_lock

    out = tmp_path / "busy"
    cfg = base_config(tmp_path / "cache")
    with run_lock(out):  # the other job
        with pytest.raises(RuntimeError) as err:
            run_spawned(_train_worker, 2, cfg.to_dict(), str(out), (2, 1, 1), "dualpipev", False, timeout_s=30)
    text = str(err.value)
    assert "collective failed" not in text, text[:3000]
    for rank in (0, 1):
        assert f"rank {rank}: ValueError: {out} is in use by another training process" in text, text[:3000]
    assert [p.name for p in out.iterdir()] == [".lock"]


def _slow_reader_worker(rank: int, world: int, cfg_dict: dict, out: str) -> None:
    """_microbatch_worker, with rank 1 reading the new run's tokenizer late (a slower process or filesystem)."""
    import nanoseek.distributed.train as dist_train

    prepare = dist_train.prepare_data

    def slow(*args, **kw):
        if rank == 1:
            time.sleep(3)
        return prepare(*args, **kw)

    dist_train.prepare_data = slow
    _microbatch_worker(rank, world, cfg_dict, out)


def test_a_setup_error_after_the_data_is_every_ranks_own(reference):
    """A setting every rank rejects once the data is read (--microbatches that do not split the batch): each rank
    stops with it. Rank 0 removes the failed start's files, tokenizer.json among them, only once every rank has
    read them (a slower rank 1 used to fail first on the missing file, "rank 1: no tokenizer.json", the wrong
    cause, printed at once)."""
    root, cache = reference
    out = root / "slow_reader"
    with pytest.raises(RuntimeError) as err:
        run_spawned(_slow_reader_worker, 2, base_config(cache).to_dict(), str(out), timeout_s=60)
    text = str(err.value)
    assert "tokenizer" not in text, text[:3000]
    for rank in (0, 1):
        assert f"rank {rank}: ValueError: --microbatches 3: each data rank's 8 sequences" in text, text[:3000]
    assert [p.name for p in out.iterdir()] == [".lock"]


def test_a_usage_error_under_torchrun_is_said_by_rank_0(monkeypatch, capsys):
    """argparse's errors (an unknown flag, a bad value) under torchrun: rank 0 says it; another rank first waits
    for torchrun to end it, as for the errors every rank shares (each rank used to print usage and error)."""
    import types

    import nanoseek.errors as errors
    from nanoseek.cli import main

    waits: list[float] = []
    monkeypatch.setattr(errors, "time", types.SimpleNamespace(sleep=waits.append))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    for argv, said in ((["train", "--ep", "2", "--bogus", "3"], "unrecognized arguments: --bogus 3"),
                       (["train", "--steps", "abc"], "argument --steps: invalid int value: 'abc'")):
        for rank in (0, 1):
            monkeypatch.setenv("RANK", str(rank))
            waits.clear()
            with pytest.raises(SystemExit) as stop:
                main(argv)
            assert stop.value.code == 2
            err = capsys.readouterr().err
            assert waits == ([] if rank == 0 else [errors.RANK0_GRACE_S])
            assert err.endswith("nanoseek train: error: " + ("rank 1: " if rank else "") + said + "\n"), err


def _dropped_interrupt_worker(rank: int, world: int, cfg_dict: dict, out: str) -> None:
    """_train_worker (EP=2) where Ctrl-C comes in the first step: its KeyboardInterrupt is dropped (as torch's
    autograd engine can drop one raised while a backward pass waits in an all-to-all), then the collective fails
    as the interrupted peers exit."""
    import signal

    import nanoseek.distributed.train as dist_train

    # as under torchrun at a terminal: a shell without job control (CI scripts, `cmd &`) starts background jobs
    # with SIGINT ignored, and the spawned ranks inherit that
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def step(self, s):
        try:
            signal.raise_signal(signal.SIGINT)
            time.sleep(1)  # the handler has run by now
        except KeyboardInterrupt:
            pass
        raise RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1234")

    dist_train.DistributedTrainer._step = step
    _train_worker(rank, world, cfg_dict, out, (2, 1, 1), "dualpipev", False)


def test_a_ctrl_c_whose_interrupt_torch_dropped_is_an_interrupt(reference):
    """Ctrl-C under torchrun (which sends SIGINT to every rank) during expert parallelism: a rank whose
    KeyboardInterrupt torch dropped sees its all-to-all fail as the other ranks exit; it stops as interrupted
    (rank 0 then says "interrupted; continue with ..."), not with "a peer rank died or hangs"."""
    root, cache = reference
    with pytest.raises(RuntimeError) as err:
        run_spawned(_dropped_interrupt_worker, 2, base_config(cache).to_dict(), str(root / "interrupted"),
                    timeout_s=60)
    text = str(err.value)
    assert "collective failed" not in text, text[:3000]
    for rank in (0, 1):
        assert f"rank {rank}: KeyboardInterrupt" in text, text[:3000]


def _slow_rank0_worker(rank: int, world: int, cfg_dict: dict, out: str) -> int:
    """_train_worker (EP=2; run_spawned's collectives time out after 5 s) where rank 0 takes 10 s to prepare the
    data and 10 s to write each checkpoint."""
    import nanoseek.distributed.train as dist_train
    from nanoseek.distributed.mesh import Layout
    from nanoseek.distributed.train import ParallelSettings, train_distributed

    def slow(fn):
        def call(*args, **kw):
            time.sleep(10)
            return fn(*args, **kw)
        return call

    if rank == 0:
        dist_train.prepare_data = slow(dist_train.prepare_data)
        dist_train.ckpt_io.save_checkpoint = slow(dist_train.ckpt_io.save_checkpoint)
    result = train_distributed(TrainConfig.from_dict(cfg_dict), out, ParallelSettings(Layout(2, 1, 1)), log=quiet)
    return result.step if result is not None else -1


def test_data_preparation_and_saving_longer_than_the_collective_timeout(reference):
    """Rank 0 trains the tokenizer and tokenizes the corpus, and writes the checkpoints (minutes for a large corpus
    or model), while the other ranks wait: those waits are not collectives that time out after --dist-timeout (rank
    1 used to fail with "a collective failed or timed out ... a peer rank died or hangs")."""
    root, cache = reference
    steps = run_spawned(_slow_rank0_worker, 2, base_config(cache, steps=1, eval_batches=1).to_dict(),
                        str(root / "slow_data"), timeout_s=5)  # 5 s: a margin for a loaded machine
    assert steps == [1, -1]


def test_a_ctrl_c_under_torchrun_says_how_to_resume_with_the_layout(monkeypatch, capsys, tmp_path):
    """The interrupted message's resume command under torchrun names the layout flags: without them the command
    it gave fails (torchrun's ranks need a layout)."""
    import nanoseek.distributed.train as dist_train
    import nanoseek.train.checkpoint as checkpoint
    from nanoseek.cli import main

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dist_train, "train_distributed", interrupted)
    monkeypatch.setattr(checkpoint, "current_checkpoint", lambda out: out / "checkpoint")
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--ep", "2", "--dp", "2", "--steps", "2"]) == 130
    err = capsys.readouterr().err
    assert f"interrupted; continue with: nanoseek train --resume {out} --ep 2 --dp 2 (under torchrun" in err, err
