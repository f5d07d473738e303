"""Pipeline parallelism (nanoseek/distributed/pipeline.py): 2 gloo ranks against one process.

One spawn runs every schedule (and two with the head tied to the embedding): the same initialization as a
single-process model, one batch (losses, every parameter's gradient, expert counts), then AdamW steps
(per-step losses), a forward-only eval, gradient accumulation over two steps and a bad batch.
"""

import pytest
import torch

from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.distributed.pipeline import SCHEDULES, PipelineRunner, plan_stages
from nanoseek.distributed.spawn import run_spawned
from nanoseek.objectives import training_loss

CFG = ModelConfig.preset("tiny").replace(num_hidden_layers=4)  # dense layer 0, MoE 1-3, one MTP module
TIED = CFG.replace(tie_word_embeddings=True)  # the head is the embedding: used at both ends of the pipeline
B, T, N_MB = 8, 16, 4
LAMBDA, ALPHA = 0.3, 0.1  # alpha large enough that the balance gradient is visible
N_STEPS = 3
CASES = {"dualpipev": ("dualpipev", CFG), "1f1b": ("1f1b", CFG), "interleaved-zb": ("interleaved-zb", CFG),
         "zbv": ("zbv", CFG), "dualpipev-tied": ("dualpipev", TIED), "1f1b-tied": ("1f1b", TIED)}


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, CFG.vocab_size, (B, T + 1), generator=g) for _ in range(N_STEPS + 1)]


def _model(cfg: ModelConfig) -> DeepSeekV3:
    torch.manual_seed(0)
    return DeepSeekV3(cfg)


def _optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(params), lr=3e-3, weight_decay=0.1)


def _worker(rank: int, world_size: int, cases: dict, batches: list[torch.Tensor]) -> dict:
    import torch.distributed as dist

    results = {}
    for case, (schedule, cfg) in cases.items():
        model = _model(cfg)
        if rank != 0:  # a copy of the embedding that differs from rank 0's: the runner must use rank 0's everywhere
            with torch.no_grad():
                model.embed_tokens.weight.add_(0.5)
        runner = PipelineRunner(model, dist.group.WORLD, schedule=schedule, n_microbatches=N_MB)
        first = runner.step(batches[0], LAMBDA, ALPHA)
        grads = {n: p.grad.clone() for n, p in runner.named_parameters()}
        counts = runner.expert_counts()
        dup = [n for n, p in runner.named_parameters() if any(p is q for q in runner.duplicate_params)]
        optimizer = _optimizer(runner.parameters())
        optimizer.step()
        losses = [first]
        for batch in batches[1:]:
            optimizer.zero_grad()
            losses.append(runner.step(batch, LAMBDA, ALPHA))
            optimizer.step()
        results[case] = dict(losses=losses, grads=grads, counts=counts, duplicates=dup,
                                 embed=model.embed_tokens.weight.detach().clone(),
                                 eval=runner.eval_loss(batches[0]), early_sends=runner.early_sends,
                                 accumulation=_accumulation(runner, batches[0], batches[1]))
        try:  # a bad batch raises on every rank (no rank is left waiting in the schedule)
            runner.step(batches[0][:6], LAMBDA, ALPHA)
        except ValueError as e:
            results[case]["error"] = str(e)
        for key, batch in (("shapes", batches[0] if rank == 0 else batches[0][:4]),  # ranks disagree on B
                           ("missing", None if rank == 0 else batches[0])):  # rank 0 holds stage 0
            try:
                runner.step(batch, LAMBDA, ALPHA)
            except ValueError as e:
                results[case][key] = str(e)
    return results


def _accumulation(runner: PipelineRunner, a: torch.Tensor, b: torch.Tensor) -> float:
    """Two step() calls without zeroing accumulate: grad(a then b) == grad(a) + grad(b); the worst error."""
    def grads(*batches):
        for p in runner.parameters():
            p.grad = None
        for batch in batches:
            runner.step(batch, LAMBDA, ALPHA)
        return [p.grad.clone() for p in runner.parameters()]

    both = grads(a, b)
    return max((x - (y + z)).abs().max().item() for x, y, z in zip(both, grads(a), grads(b)))


def _reference(cfg: ModelConfig, batches: list[torch.Tensor]) -> dict:
    model = _model(cfg)
    optimizer = _optimizer(model.parameters())
    losses, grads, counts = [], None, None
    for i, batch in enumerate(batches):
        optimizer.zero_grad()
        out = model.forward_train(batch[:, :-1])
        terms = training_loss(out, batch[:, 1:], mtp_lambda=LAMBDA, balance_alpha=ALPHA)
        terms.total.backward()
        losses.append(terms)
        if i == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            moe = [n for n, m in model.named_modules() if n.endswith("mlp") and hasattr(m, "gate")]
            counts = dict(zip(moe, out.expert_counts))
        optimizer.step()
    with torch.no_grad():
        logits = model(batches[0][:, :-1])
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batches[0][:, 1:].flatten(), reduction="sum")
    return dict(losses=losses, grads=grads, counts=counts, eval=(ce.item(), B * T))


@pytest.fixture(scope="module")
def runs():
    batches = _batches()
    refs = {False: _reference(CFG, batches), True: _reference(TIED, batches)}
    return refs, run_spawned(_worker, 2, CASES, batches, timeout_s=120)


@pytest.mark.parametrize("case", CASES)
def test_pipeline_matches_single_process(runs, case):
    refs, ranks = runs
    schedule, cfg = CASES[case]
    ref = refs[cfg.tie_word_embeddings]
    got = [r[case] for r in ranks]
    # losses of the first step, identical on both ranks
    for r in got:
        first, terms = r["losses"][0], ref["losses"][0]
        assert first.total == pytest.approx(terms.total.item(), rel=1e-5)
        assert first.main == pytest.approx(terms.main.item(), rel=1e-5)
        assert first.mtp == pytest.approx(terms.mtp.item(), rel=1e-5)
        assert first.mtp_per_depth == pytest.approx([t.item() for t in terms.mtp_per_depth], rel=1e-5)
        assert first.balance == pytest.approx(terms.balance.item(), rel=1e-5)
    # every parameter's gradient, by name; each parameter on one rank (plus the declared duplicates)
    seen: dict[str, int] = {}
    for r in got:
        for name, g in r["grads"].items():
            seen[name] = seen.get(name, 0) + 1
            torch.testing.assert_close(g, ref["grads"][name], rtol=1e-5, atol=2e-8, msg=f"{case}: {name}")
    assert set(seen) == set(ref["grads"])
    assert {n for n, c in seen.items() if c > 1} == {n for r in got for n in r["duplicates"]}
    if schedule in ("1f1b", "interleaved-zb"):  # the last stage's embedding copy lives on rank 1
        assert got[0]["duplicates"] == [] and got[1]["duplicates"] == ["embed_tokens.weight"]
        torch.testing.assert_close(got[0]["embed"], got[1]["embed"], rtol=0, atol=0)  # still equal after AdamW
    else:
        assert got[0]["duplicates"] == got[1]["duplicates"] == []
    # expert counts of the step, by MoE module name, split across the ranks
    counts = {**got[0]["counts"], **got[1]["counts"]}
    assert set(counts) == set(ref["counts"]) == {"layers.1.mlp", "layers.2.mlp", "layers.3.mlp", "mtp.0.block.mlp"}
    for name, c in counts.items():
        assert c.dtype == torch.int64 and torch.equal(c, ref["counts"][name].to(torch.int64)), name
    # AdamW steps on each rank's own parameters give the single-process losses
    for r in got:
        assert [x.total for x in r["losses"]] == pytest.approx([t.total.item() for t in ref["losses"]], rel=1e-5)
    # gradients accumulate over step() calls, the duplicate's exchange included; bad batches raise everywhere,
    # batches of different shapes on the ranks and a missing one included (instead of a hang in the schedule)
    for r in got:
        assert r["accumulation"] < 1e-7
        assert r["error"] == "batch size 6 is not divisible into n_microbatches=4 equal micro-batches"
        assert r["shapes"] == "pp ranks got batches of different shapes (B 4..8, T+1 17..17)"
        assert r["missing"] == "the pp ranks holding stage 0 and the last stage need the batch (got None)"
    # DualPipeV's F&B starts the forward's send before the backward (here: stage 0's F paired with 3's B)
    assert (got[0]["early_sends"] > 0) == (schedule == "dualpipev")
    # forward-only evaluation after training
    for r in got:
        assert r["eval"][1] == ref["eval"][1]
        assert r["eval"][0] == pytest.approx(ref["eval"][0], rel=1e-5)


def test_plan_stages_layouts_and_errors():
    cfg = CFG.replace(num_hidden_layers=7)
    v = plan_stages(cfg, 2, "dualpipev", 4)
    assert [len(r) for r in v.layers] == [2, 2, 2, 1] and v.stage_rank == (0, 1, 1, 0)
    loop = plan_stages(cfg, 2, "interleaved-zb", 4)
    assert loop.stage_rank == (0, 1, 0, 1)
    assert [list(r) for r in plan_stages(cfg, 2, "1f1b", 2).layers] == [[0, 1, 2, 3], [4, 5, 6]]
    with pytest.raises(ValueError, match="unknown pipeline schedule 'gpipe'"):
        plan_stages(cfg, 2, "gpipe", 4)
    with pytest.raises(ValueError, match="4 layers cannot be split into the 8 stages of dualpipev"):
        plan_stages(CFG, 4, "dualpipev", 8)
    with pytest.raises(ValueError, match="4 layers cannot be split into the 8 stages of interleaved-zb"):
        plan_stages(CFG, 4, "interleaved-zb", 8)
    with pytest.raises(ValueError, match="needs at least 4 micro-batches, got n_microbatches=3"):
        plan_stages(CFG, 2, "dualpipev", 3)
    with pytest.raises(ValueError, match="needs at least 2 micro-batches"):
        plan_stages(CFG, 2, "1f1b", 1)
    with pytest.raises(ValueError, match="n_microbatches=5 in 2 equal rounds"):
        plan_stages(CFG, 2, "interleaved-zb", 5)
    with pytest.raises(ValueError, match="at least 2 ranks"):
        plan_stages(CFG, 1, "1f1b", 4)
    assert {schedule for schedule, _ in CASES.values()} == set(SCHEDULES)
