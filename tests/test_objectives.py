"""Training objectives (nanoseek/objectives.py): hand-computed values, then the tiny model end to end."""

import math

import pytest
import torch

from nanoseek import DeepSeekV3, ModelConfig, ModelOutput
from nanoseek.model.moe import Routing
from nanoseek.objectives import (
    ExpertLoadTracker,
    cross_entropy_sums,
    max_violation,
    mean_max_violation,
    moe_routers,
    mtp_loss,
    next_token_loss,
    sequence_balance_loss,
    training_loss,
    update_balance_bias,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


# ---------------------------------------------------------------------------------------------- cross-entropy
def test_next_token_loss_three_token_vocab():
    # position 0: logits [0, 0, 0]     -> p = [1/3, 1/3, 1/3], target 2 -> -log(1/3) = ln 3 = 1.098612
    # position 1: logits [0, ln2, 0]   -> p = [1/4, 1/2, 1/4], target 1 -> -log(1/2) = ln 2 = 0.693147
    # position 2: same logits, target ignored (-100): counts in neither sum nor denominator
    # mean = (ln 3 + ln 2) / 2 = ln 6 / 2 = 0.895880
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, LN2, 0.0], [0.0, LN2, 0.0]]])
    labels = torch.tensor([[2, 1, -100]])
    loss = next_token_loss(logits, labels)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(0.895880, abs=1e-6)
    # target 0 at position 1 instead: -log(1/4) = ln 4 = 1.386294; mean = (1.098612 + 1.386294) / 2 = 1.242453
    assert next_token_loss(logits, torch.tensor([[2, 0, -100]])).item() == pytest.approx(1.242453, abs=1e-6)
    # bf16 logits are upcast: the result is fp32
    assert next_token_loss(logits.bfloat16(), labels).dtype == torch.float32
    # nothing to predict: 0, not NaN
    assert next_token_loss(logits, torch.full((1, 3), -100)).item() == 0.0
    # labels (T, B) against logits (B, T, V): as many targets, paired wrongly; an error, not a number
    with pytest.raises(ValueError):
        next_token_loss(torch.zeros(2, 3, 5), torch.zeros(3, 2, dtype=torch.long))


def test_next_token_loss_compiled_form():
    """Under torch.compile the loss is logsumexp(z) - z_y with z_y a masked row sum (a faster graph): the hand
    values above, and value and gradient equal to F.cross_entropy's on random bf16 logits with ignored labels."""
    compiled = torch.compile(next_token_loss, dynamic=False)
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, LN2, 0.0], [0.0, LN2, 0.0]]])
    assert compiled(logits, torch.tensor([[2, 1, -100]])).item() == pytest.approx(0.895880, abs=1e-6)
    assert compiled(logits, torch.full((1, 3), -100)).item() == 0.0
    torch.manual_seed(0)
    z = (3 * torch.randn(2, 7, 50)).bfloat16()
    labels = torch.randint(0, 50, (2, 7))
    labels[0, 3] = labels[1, 0] = -100
    grads = []
    for fn in (next_token_loss, compiled):
        x = z.clone().requires_grad_()
        loss = fn(x, labels)
        loss.backward()
        grads.append((loss.detach(), x.grad.float()))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-2, atol=1e-5)  # bf16 gradients
    assert grads[0][1][0, 3].abs().max() == 0 and grads[1][1][0, 3].abs().max() == 0  # ignored: no gradient


# ---------------------------------------------------------------------------------------------- MTP
def _one_hot_logits(targets: torch.Tensor, vocab: int, scale: float = 50.0) -> torch.Tensor:
    return scale * torch.nn.functional.one_hot(targets, vocab).float()


def test_mtp_alignment():
    # tokens t_0..t_6 = 1..7; input t_0..t_5, labels[i] = t_{i+1}
    V = 8
    labels = torch.tensor([[2, 3, 4, 5, 6, 7]])  # (1, T=6)
    # depth 1, position i predicts t_{i+2} = labels[:, i+1]: the correct targets are labels[:, 1:] = 3..7
    right = _one_hot_logits(labels[:, 1:], V)  # (1, 5, V)
    mean, per_depth = mtp_loss([right], labels)
    # a logit of 50 on the target: CE = log(1 + 7 e^-50) ~ 1.4e-21
    assert len(per_depth) == 1 and mean.item() < 1e-6 and per_depth[0].item() < 1e-6
    # logits aligned one position too early (they predict t_{i+1}, the main head's target): the target gets
    # logit 0 against one logit of 50, CE = log(e^50 + 7) = 50.0
    wrong = _one_hot_logits(labels[:, :-1], V)
    assert mtp_loss([wrong], labels)[0].item() == pytest.approx(50.0, abs=1e-4)

    # two depths: depth 2 (1, 4, V) targets labels[:, 2:] = 4..7; make it uniform -> L_2 = ln 8 = 2.079442
    uniform = torch.zeros(1, 4, V)
    mean, per_depth = mtp_loss([right, uniform], labels)
    assert per_depth[1].item() == pytest.approx(2.079442, abs=1e-6)
    assert mean.item() == pytest.approx(2.079442 / 2, abs=1e-6)  # (L_1 + L_2) / D with L_1 ~ 0

    # an ignored label (end of a window) drops the position that predicts it at every depth
    labels_ign = torch.tensor([[2, 3, 4, 5, 6, -100]])
    wrong_last = right.clone()
    wrong_last[0, -1] = 0.0  # depth-1 position 4 predicts labels[:, 5], which is now ignored
    assert mtp_loss([wrong_last], labels_ign)[0].item() < 1e-6

    with pytest.raises(ValueError):
        mtp_loss([right[:, :4]], labels)  # wrong length for depth 1
    mean, per_depth = mtp_loss([], labels)
    assert mean.item() == 0.0 and per_depth == []


# ---------------------------------------------------------------------------------------------- balance loss
# One sequence, T = 2 tokens, E = 4 experts, K = 2.
#   token 0: s = [0.5, 0.3, 0.1, 0.1] (sum 1)  -> s' = [0.5, 0.3, 0.1, 0.1];  selected {0, 1}
#   token 1: s = [0.4, 0.8, 0.4, 0.4] (sum 2)  -> s' = [0.2, 0.4, 0.2, 0.2];  selected {1, 2}
#   hits = [1, 2, 1, 0]; f = E/(K T) * hits = 4/4 * hits = [1, 2, 1, 0]
#   P = mean_t s' = [0.35, 0.35, 0.15, 0.15]
#   L = 1*0.35 + 2*0.35 + 1*0.15 + 0*0.15 = 1.20
# Gradient (f is constant): dL/ds_{j,t} = (1/(T S_t)) (f_j - sum_i f_i s'_{i,t})
#   token 0: S = 1, sum f s' = 0.5 + 0.6 + 0.1 = 1.2 -> (1/2)[1-1.2, 2-1.2, 1-1.2, 0-1.2] = [-0.1, 0.4, -0.1, -0.6]
#   token 1: S = 2, sum f s' = 0.2 + 0.8 + 0.2 = 1.2 -> (1/4)[-0.2, 0.8, -0.2, -1.2]      = [-0.05, 0.2, -0.05, -0.3]
HAND_SCORES = [[0.5, 0.3, 0.1, 0.1], [0.4, 0.8, 0.4, 0.4]]
HAND_TOPK = [[0, 1], [1, 2]]
HAND_GRAD = [[-0.1, 0.4, -0.1, -0.6], [-0.05, 0.2, -0.05, -0.3]]


def _routing(scores, topk, dtype=torch.float32) -> Routing:
    scores = torch.tensor(scores, dtype=dtype).requires_grad_(True)
    topk = torch.tensor(topk)
    counts = torch.bincount(topk.flatten(), minlength=scores.shape[-1])
    return Routing(topk, scores, counts)


def test_sequence_balance_loss_hand_value_and_gradient():
    r = _routing([HAND_SCORES], [HAND_TOPK])
    loss = sequence_balance_loss([r], n_experts=4, top_k=2)
    assert loss.item() == pytest.approx(1.20, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(r.scores.grad, torch.tensor([HAND_GRAD]), atol=1e-6, rtol=0)

    # and the same against finite differences in float64 (selection held fixed: f is a count)
    topk = torch.tensor([HAND_TOPK])
    scores64 = torch.tensor([HAND_SCORES], dtype=torch.float64, requires_grad=True)
    fn = lambda s: sequence_balance_loss([Routing(topk, s, None)], 4, 2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (scores64,))

    with pytest.raises(ValueError):
        sequence_balance_loss([r], n_experts=8, top_k=2)


def test_sequence_balance_loss_balanced_batches_and_layers():
    # balanced routing: token 0 -> {0, 1}, token 1 -> {2, 3}; hits = [1,1,1,1], f_i = 1, so
    # L = sum_i P_i = (1/T) sum_t sum_i s'_{i,t} = 1.0 whatever the scores are
    scores = [[0.9, 0.2, 0.7, 0.05], [0.1, 0.6, 0.3, 0.8]]
    balanced = _routing([scores], [[[0, 1], [2, 3]]])
    assert sequence_balance_loss([balanced], 4, 2).item() == pytest.approx(1.0, abs=1e-6)
    # uniform affinities: P_i = 1/E and sum_i f_i = E, so L = 1.0 whatever the routing is
    uniform = _routing([[[0.3] * 4, [0.3] * 4]], [[[0, 1], [0, 1]]])
    assert sequence_balance_loss([uniform], 4, 2).item() == pytest.approx(1.0, abs=1e-6)
    # collapsed routing: both tokens pick {0, 1}: f = [2, 2, 0, 0], P = [0.35, 0.35, .15, .15] -> 1.4
    collapsed = _routing([HAND_SCORES], [[[0, 1], [0, 1]]])
    assert sequence_balance_loss([collapsed], 4, 2).item() == pytest.approx(1.4, abs=1e-6)
    # batch of two sequences (the hand example and the balanced one): mean over sequences (1.2 + 1.0) / 2
    batch = _routing([HAND_SCORES, scores], [HAND_TOPK, [[0, 1], [2, 3]]])
    assert sequence_balance_loss([batch], 4, 2).item() == pytest.approx(1.1, abs=1e-6)
    # two MoE layers: summed, 1.2 + 1.0
    hand = _routing([HAND_SCORES], [HAND_TOPK])
    assert sequence_balance_loss([hand, balanced], 4, 2).item() == pytest.approx(2.2, abs=1e-6)
    assert sequence_balance_loss([], 4, 2).item() == 0.0


def test_training_loss_combines_terms():
    # main: 3-token example above (0.895880); MTP depth 1 uniform over V = 3 (ln 3); balance 1.2 (hand example)
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, LN2, 0.0], [0.0, LN2, 0.0]]])
    labels = torch.tensor([[2, 1, -100]])
    out = ModelOutput(logits=logits, hidden=torch.zeros(1, 3, 1), mtp_logits=[torch.zeros(1, 2, 3)],
                      routing=[_routing([HAND_SCORES], [HAND_TOPK])])
    # depth-1 targets: labels[:, 1:] = [1, -100] -> one valid position, L_1 = ln 3
    terms = training_loss(out, labels, mtp_lambda=0.3, balance_alpha=0.01)
    assert terms.main.item() == pytest.approx(0.895880, abs=1e-6)
    assert terms.mtp.item() == pytest.approx(LN3, abs=1e-6)
    assert [t.item() for t in terms.mtp_per_depth] == pytest.approx([LN3], abs=1e-6)
    assert terms.balance.item() == pytest.approx(1.2, abs=1e-6)
    # total = 0.895880 + 0.3 * 1.098612 + 0.01 * 1.2 = 0.895880 + 0.329584 + 0.012 = 1.237464
    assert terms.total.item() == pytest.approx(1.237464, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_training_loss_takes_labels_of_any_integer_dtype(dtype):
    """The model takes int32 ids, but labels sliced from the same int32 tokens failed in cross_entropy
    ('expected target dtype to be Long'); float labels are named instead."""
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, LN2, 0.0], [0.0, LN2, 0.0]]])
    out = ModelOutput(logits=logits, hidden=torch.zeros(1, 3, 1), mtp_logits=[torch.zeros(1, 2, 3)])
    labels = torch.tensor([[2, 1, 1]])
    expected = training_loss(out, labels)
    terms = training_loss(out, labels.to(dtype))
    torch.testing.assert_close(terms.total, expected.total)
    torch.testing.assert_close(terms.main, expected.main)
    with pytest.raises(ValueError, match="labels must be integer token ids, got torch.float32"):
        training_loss(out, labels.float())


def test_training_loss_two_depths_and_another_ignore_index():
    """lambda applies once to the mean over D = 2 depths (lambda / D * sum_k L_k, not divided by D again), and an
    ignore_index other than -100 reaches the main and the MTP cross-entropies. labels = [2, 1, 0, -1], V = 3:
      main: uniform logits at the 3 valid positions                                     -> ln 3 = 1.098612
      depth 1 (targets [1, 0, -1]): logits [0, ln2, 0] twice -> -log(1/2), -log(1/4)     -> L_1 = 1.5 ln 2 = 1.039721
      depth 2 (targets [0, -1]): logits [ln2, 0, 0]           -> -log(1/2)               -> L_2 = ln 2 = 0.693147
      total = 1.098612 + 0.3 * (1.039721 + 0.693147) / 2 = 1.098612 + 0.259930 = 1.358542"""
    labels = torch.tensor([[2, 1, 0, -1]])
    depth1 = torch.tensor([[[0.0, LN2, 0.0], [0.0, LN2, 0.0], [5.0, 0.0, 0.0]]])
    depth2 = torch.tensor([[[LN2, 0.0, 0.0], [0.0, 0.0, 5.0]]])
    out = ModelOutput(logits=torch.zeros(1, 4, 3), hidden=torch.zeros(1, 4, 1), mtp_logits=[depth1, depth2])
    terms = training_loss(out, labels, mtp_lambda=0.3, balance_alpha=0.01, ignore_index=-1)
    assert terms.main.item() == pytest.approx(LN3, abs=1e-6)
    assert [t.item() for t in terms.mtp_per_depth] == pytest.approx([1.5 * LN2, LN2], abs=1e-6)
    assert terms.mtp.item() == pytest.approx(1.25 * LN2, abs=1e-6)
    assert terms.balance.item() == 0.0  # no MoE layer
    assert terms.total.item() == pytest.approx(1.358542, abs=1e-6)


# ---------------------------------------------------------------------------------------------- loss-free bias
def _one_router_model() -> DeepSeekV3:
    # one dense layer, one MoE layer with E = 4 experts, no MTP: exactly one router
    cfg = ModelConfig.preset("tiny").replace(num_hidden_layers=2, n_routed_experts=4, num_experts_per_tok=2,
                                             n_group=1, topk_group=1, num_nextn_predict_layers=0)
    return DeepSeekV3(cfg)


def test_update_balance_bias_hand_example():
    model = _one_router_model()
    (router,) = moe_routers(model)
    # mean(c) = 2: expert 0 overloaded (3 > 2) -> -gamma; expert 1 underloaded -> +gamma; experts 2, 3 at the
    # mean -> sign 0, unchanged
    update_balance_bias(model, torch.tensor([[3, 1, 2, 2]]), gamma=0.1)
    torch.testing.assert_close(router.e_score_correction_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    update_balance_bias(model, torch.tensor([[3, 1, 2, 2]]), gamma=0.1)  # accumulates step after step
    torch.testing.assert_close(router.e_score_correction_bias, torch.tensor([-0.2, 0.2, 0.0, 0.0]))
    with pytest.raises(ValueError):
        update_balance_bias(model, torch.tensor([[3, 1, 2, 2], [2, 2, 2, 2]]), gamma=0.1)  # 2 rows, 1 router


def test_update_balance_bias_skips_routers_without_bias():
    cfg = ModelConfig.preset("tiny").replace(scoring_func="softmax", topk_method="group_limited_greedy")
    model = DeepSeekV3(cfg)
    routers = moe_routers(model)
    assert routers and all(r.e_score_correction_bias is None for r in routers)
    update_balance_bias(model, torch.ones(len(routers), cfg.n_routed_experts, dtype=torch.long), gamma=0.1)


def test_expert_load_tracker():
    tracker = ExpertLoadTracker()
    first = torch.tensor([[1, 0, 2, 1]])
    tracker.add(first)
    tracker.add(torch.tensor([[2, 1, 0, 1]]))
    torch.testing.assert_close(tracker.take(), torch.tensor([[3, 1, 2, 2]]))
    assert first.tolist() == [[1, 0, 2, 1]]  # the sum is the tracker's own: the caller's counts are left as they were
    with pytest.raises(RuntimeError):
        tracker.take()  # reset after take
    tracker.add(torch.tensor([[1, 1]]))
    with pytest.raises(ValueError):
        tracker.add(torch.tensor([[1, 1, 1]]))


# ---------------------------------------------------------------------------------------------- MaxVio
def test_max_violation():
    # [3, 1, 2, 2]: mean 2, max 3 -> (3 - 2) / 2 = 0.5; [2, 2, 2, 2] -> 0; [8, 0, 0, 0]: (8 - 2) / 2 = 3
    counts = torch.tensor([[3, 1, 2, 2], [2, 2, 2, 2], [8, 0, 0, 0]])
    torch.testing.assert_close(max_violation(counts), torch.tensor([0.5, 0.0, 3.0]))
    assert max_violation(torch.tensor([3, 1, 2, 2])).item() == pytest.approx(0.5)
    assert mean_max_violation(counts) == pytest.approx(3.5 / 3)
    assert max_violation(torch.zeros(1, 4)).item() == 0.0  # no tokens: no violation


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = DeepSeekV3(ModelConfig.preset("tiny"))
    tokens = torch.randint(0, model.config.vocab_size, (2, 17))
    return model, tokens[:, :-1], tokens[:, 1:]


def test_routers_follow_routing_order(tiny):
    model, x, _ = tiny
    routers = moe_routers(model)
    seen = []
    hooks = [r.register_forward_hook(lambda mod, inp, out, i=i: seen.append((i, out[2]))) for i, r in
             enumerate(routers)]
    try:
        out = model.forward_train(x)
    finally:
        for h in hooks:
            h.remove()
    # 2 MoE layers (layer 0 is dense) + 1 MTP block
    assert len(routers) == len(out.routing) == 3
    assert [i for i, _ in seen] == [0, 1, 2]
    for (i, scores_TE), r in zip(seen, out.routing):
        assert torch.equal(scores_TE, r.scores.reshape(-1, r.scores.shape[-1]))


def test_training_loss_backward_tiny(tiny):
    model, x, y = tiny
    model.zero_grad(set_to_none=True)
    out = model.forward_train(x)
    terms = training_loss(out, y)
    assert len(terms.mtp_per_depth) == 1 and terms.balance.item() > 0
    # an untrained model is near uniform: main and MTP CE close to ln V = ln 256 = 5.545
    assert abs(terms.main.item() - math.log(256)) < 0.1 and abs(terms.mtp.item() - math.log(256)) < 0.1
    # about one per MoE layer (3 of them) at initialization
    assert 2.5 < terms.balance.item() < 4.0
    terms.total.backward()
    mtp = model.mtp[0]
    for name in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight", "block.mlp.gate.weight",
                 "block.self_attn.o_proj.weight"):
        grad = mtp.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name

    # the MTP loss alone trains the main model too (V3 §2.2: h^0 is the main model's output, not detached) and the
    # shared embedding and output head
    model.zero_grad(set_to_none=True)
    training_loss(model.forward_train(x), y).mtp.backward()
    for name in ("layers.0.self_attn.q_a_proj.weight", "layers.2.mlp.shared_experts.down_proj.weight",
                 "layers.2.mlp.experts.down_proj", "norm.weight", "embed_tokens.weight", "lm_head.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name

    # the balance loss alone reaches every router's centroids
    model.zero_grad(set_to_none=True)
    out = model.forward_train(x)
    cfg = model.config
    sequence_balance_loss(out.routing, cfg.n_routed_experts, cfg.num_experts_per_tok).backward()
    for router in moe_routers(model):
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad is None  # nothing of the output head enters the balance loss
    model.zero_grad(set_to_none=True)


def test_update_balance_bias_tiny(tiny):
    model, x, _ = tiny
    routers = moe_routers(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    tracker = ExpertLoadTracker()
    with torch.no_grad():
        for micro in x.split(1):  # two micro-batches of one sequence
            tracker.add(model.forward_train(micro).expert_counts)
        full = model.forward_train(x).expert_counts
    counts = tracker.take()
    torch.testing.assert_close(counts, full)  # micro-batches sum to the whole batch (routing is per token)
    assert counts.sum(-1).tolist() == [32 * 4, 32 * 4, 30 * 4]  # tokens x K; the MTP block sees T - 1
    update_balance_bias(model, counts, gamma=0.001)
    for router, c in zip(routers, counts.float()):
        expected = 0.001 * torch.sign(c.mean() - c)
        torch.testing.assert_close(router.e_score_correction_bias, expected)
        assert (expected != 0).any()
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n

    # the bias steers selection only: push expert 0 far down and nobody picks it
    for router in routers:
        router.e_score_correction_bias.zero_()
        router.e_score_correction_bias[0] = -100.0
    with torch.no_grad():
        assert model.forward_train(x).expert_counts[:, 0].sum().item() == 0
    for router in routers:
        router.e_score_correction_bias.zero_()


@pytest.mark.parametrize("gamma", [float("nan"), float("inf"), "0.001", None])
def test_update_balance_bias_refuses_a_gamma_that_is_not_a_finite_number(tiny, gamma):
    """A NaN gamma turned every balancing bias into NaN silently; a string failed inside the update."""
    model, x, _ = tiny
    with torch.no_grad():
        counts = model.forward_train(x).expert_counts
    before = [r.e_score_correction_bias.clone() for r in moe_routers(model)]
    with pytest.raises(ValueError, match="gamma must be a finite number"):
        update_balance_bias(model, counts, gamma)
    for router, b in zip(moe_routers(model), before):
        assert torch.equal(router.e_score_correction_bias, b)


def test_cross_entropy_sums_count_no_ignored_position():
    """Labels of ignore_index (-100) were left out of the sums by cross_entropy but counted in the number of
    positions, so sum / n came out too small; int32 labels failed."""
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, LN2, 0.0], [0.0, LN2, 0.0]]])
    labels = torch.tensor([[2, 1, -100]])
    (main_sum, main_n), (d1_sum, d1_n) = cross_entropy_sums([logits, torch.zeros(1, 2, 3)], labels.int())
    assert (main_n, d1_n) == (2, 1)
    assert main_sum / main_n == pytest.approx(next_token_loss(logits, labels).item(), abs=1e-6)
    assert d1_sum == pytest.approx(LN3, abs=1e-6)


def test_cross_entropy_sums_by_hand():
    """Validation sums: depth k's position i predicts labels[:, i + k] (SPEC §5); -log softmax summed."""
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (2, 4))
    logits = [torch.randn(2, 4 - k, 5, dtype=torch.bfloat16) for k in range(3)]
    got = cross_entropy_sums(logits, labels)
    for k, (total, n) in enumerate(got):
        z = logits[k].double()
        expected = -sum(float(z[b, i].log_softmax(-1)[labels[b, i + k]]) for b in range(2) for i in range(4 - k))
        assert n == 2 * (4 - k) and total == pytest.approx(expected, rel=1e-5)
