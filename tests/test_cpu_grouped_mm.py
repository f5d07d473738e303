"""The grouped bf16 CPU kernel of the routed experts (nanoseek.model.cpu_grouped_mm, csrc/grouped_mm_bf16.cpp):
its three products against fp32 references, its gradients against fp32 autograd, expert_ffn's use of it (eager
and compiled in one graph) against torch._grouped_mm, and its input checks."""

import contextlib

import pytest
import torch

import nanoseek.model.experts as experts_mod
from nanoseek.config import ModelConfig
from nanoseek.model import cpu_grouped_mm
from nanoseek.model.moe import RoutedExperts

needs_kernel = pytest.mark.skipif(not cpu_grouped_mm.available(),
                                  reason="the kernel needs Linux on an x86 CPU with AVX-512 bf16 and a C++ compiler")


def _groups(offs):
    """(start, end) rows of each group."""
    ends = offs.tolist()
    return list(zip([0] + ends[:-1], ends))


def _inputs(counts, S, N, K, seed=0):
    """bf16 rows x (S, K), output gradients dy (S, N), weights w (E, N, K) and the groups' int32 offsets."""
    g = torch.Generator().manual_seed(seed)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x, dy = torch.randn(S, K, generator=g).bfloat16(), torch.randn(S, N, generator=g).bfloat16()
    w = torch.randn(len(counts), N, K, generator=g).bfloat16()
    return x, dy, w, offs


def _reference(x, w, offs):
    """fp32 x_e w_e^T per group (S, N), zeros past the last group."""
    y = torch.zeros(x.shape[0], w.shape[1])
    for e, (a, b) in enumerate(_groups(offs)):
        y[a:b] = x[a:b].float() @ w[e].float().t()
    return y


def _close(got, expected):
    """bf16 results of fp32 sums: off by their own rounding (and the sums' order)."""
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected, atol=1e-2 * expected.abs().max().item() + 1e-6, rtol=1e-2)


SHAPES = [  # counts per group, rows S (>= their sum), N, K
    ([5, 0, 17, 3], 30, 40, 24),         # an empty group, odd groups, rows past the last; N, K not multiples of 16
    ([33, 64, 0, 1, 96], 200, 512, 256),  # the bench's widths (one 64-column panel = 4 vectors)
    ([0, 0], 4, 16, 16),                  # no rows at all
    ([7], 7, 2, 2),                       # one pair
    ([50, 50, 50], 160, 100, 70),        # a partial vector and a partial panel
    ([192, 224, 160], 600, 130, 66),      # whole micro-tiles and row tails
]


@needs_kernel
@pytest.mark.parametrize("counts,S,N,K", SHAPES)
def test_products_match_fp32(counts, S, N, K):
    x, dy, w, offs = _inputs(counts, S, N, K)
    y = cpu_grouped_mm.grouped_mm_bf16(x, w, offs)  # (S, N)
    _close(y, _reference(x, w, offs))
    dx = cpu_grouped_mm.grouped_mm_bf16_data_grad(dy, w, offs)  # (S, K): dy_e w_e
    _close(dx, _reference(dy, w.transpose(1, 2), offs))
    dw = cpu_grouped_mm.grouped_mm_bf16_weight_grad(dy, x, offs)  # (E, N, K): dy_e^T x_e
    expected = torch.stack([dy[a:b].float().t() @ x[a:b].float() for a, b in _groups(offs)])
    _close(dw, expected)
    end = int(offs[-1])
    assert not y[end:].any() and not dx[end:].any()  # rows of no group: zeros
    for e, n in enumerate(counts):
        assert n or not dw[e].any()  # a group without rows: no gradient


@needs_kernel
def test_threads_split_the_work_without_changing_results():
    """Tasks (a group's panel of columns or block of dw rows) spread over torch's threads: each output element
    is summed in the same order by whichever thread computes it, so the results are those of one thread."""
    x, dy, w, offs = _inputs([70, 0, 33, 130, 1], 240, 136, 96)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append([cpu_grouped_mm.grouped_mm_bf16(x, w, offs),
                            cpu_grouped_mm.grouped_mm_bf16_data_grad(dy, w, offs),
                            cpu_grouped_mm.grouped_mm_bf16_weight_grad(dy, x, offs)])
    finally:
        torch.set_num_threads(threads)
    for one, three in zip(*results):
        assert torch.equal(one, three)


@needs_kernel
def test_gradients_match_fp32_autograd():
    """Through the custom op's autograd: the input gradient (S, K) and the weight gradient in the weight's own
    layout (E, N, K), against autograd of the fp32 reference on the same bf16 values."""
    x, _, w, offs = _inputs([40, 0, 33, 64], 150, 96, 80)
    probe = torch.randn(150, 96, generator=torch.Generator().manual_seed(1))
    leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    (cpu_grouped_mm.grouped_mm_bf16(*leaves, offs).float() * probe).sum().backward()
    ref = [x.float().requires_grad_(), w.float().requires_grad_()]
    (_reference(ref[0], ref[1], offs) * probe).sum().backward()
    for name, a, b in zip(("x", "w"), leaves, ref):
        assert a.grad.dtype == torch.bfloat16 and a.grad.shape == b.grad.shape, name
        torch.testing.assert_close(a.grad.float(), b.grad, atol=0.01 * b.grad.abs().max().item(), rtol=0.02,
                                   msg=lambda m, name=name: f"d{name}: {m}")


def _experts_inputs(seed=0):
    """bf16 rows sorted by expert for 8 experts (d 64, width 32), padded counts as the training step has them."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([32, 0, 64, 32, 96, 32, 0, 64])
    x = torch.randn(int(counts.sum()), 64, generator=g).bfloat16()
    gate_up = (torch.randn(8, 64, 64, generator=g) * 0.2).bfloat16()  # (E, 2F, D)
    down = (torch.randn(8, 64, 32, generator=g) * 0.2).bfloat16()  # (E, D, F)
    return x, counts, gate_up, down


def _count_calls(monkeypatch):
    calls = []
    real = cpu_grouped_mm.grouped_mm_bf16
    monkeypatch.setattr(cpu_grouped_mm, "grouped_mm_bf16", lambda *a: calls.append(1) or real(*a))
    return calls


@needs_kernel
def test_expert_ffn_takes_the_kernel_and_matches_torch_grouped_mm(monkeypatch):
    """bf16 expert_ffn runs both projections in the kernel; inside cpu_grouped_mm.disabled() it takes
    torch._grouped_mm, and the two agree within bf16 rounding, values and gradients."""
    calls = _count_calls(monkeypatch)
    results = []
    for off in (False, True):
        x, counts, gate_up, down = (t.requires_grad_() if t.is_floating_point() else t for t in _experts_inputs())
        with cpu_grouped_mm.disabled() if off else contextlib.nullcontext():
            assert cpu_grouped_mm.available() != off
            out = experts_mod.expert_ffn(x, counts, gate_up, down)
            out.float().square().sum().backward()
        results.append([out.detach(), x.grad, gate_up.grad, down.grad])
        assert len(calls) == 2  # two projections, the first time only
    for kernel, torch_path in zip(*results):
        torch.testing.assert_close(kernel.float(), torch_path.float(), atol=0.02 * torch_path.abs().max().item(),
                                   rtol=0.02)


@needs_kernel
def test_compiled_experts_are_one_graph_with_the_kernel(monkeypatch):
    """bf16 routed experts with padded groups under torch.compile: one graph with the kernel inside (fullgraph;
    the rows are a static bound past the last group, which the kernel leaves out), eager's output and gradients;
    a graph traced inside cpu_grouped_mm.disabled() is not reused outside it."""
    monkeypatch.setattr("nanoseek.devices.native_bf16", lambda device: True)  # padded groups, bf16 products
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, first_k_dense_replace=1,
                      num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                      v_head_dim=8, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4,
                      n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, max_position_embeddings=32)
    torch.manual_seed(0)
    experts = RoutedExperts(cfg)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    experts.to(torch.bfloat16)
    x = torch.randn(70, 32, dtype=torch.bfloat16, requires_grad=True)  # 140 rows >= 32 x 4 experts: padded
    w, idx = torch.rand(70, 2), torch.stack([torch.randperm(4)[:2] for _ in range(70)])
    idx[:20] = torch.tensor([0, 1])  # uneven loads
    calls = _count_calls(monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(experts, fullgraph=True)
    with cpu_grouped_mm.disabled():
        compiled(x, w, idx)
    assert calls == []
    results = []
    for fn in (experts, compiled):
        x.grad = None
        experts.zero_grad()
        out, counts = fn(x, w, idx)
        out.float().square().sum().backward()
        results.append([out.detach(), counts, x.grad, experts.gate_up_proj.grad, experts.down_proj.grad])
    assert len(calls) == 4  # eager, then the retraced graph: two projections each
    for eager, compiled_result in zip(*results):
        torch.testing.assert_close(compiled_result, eager, atol=1e-2 * eager.abs().max().item(), rtol=1e-2)


def test_switched_off_inside_disabled():
    with cpu_grouped_mm.disabled():
        assert not cpu_grouped_mm.available()


@needs_kernel
def test_bad_inputs_raise_one_line_errors():
    x, dy, w, offs = _inputs([3, 4], 8, 16, 8)
    bad = [
        (TypeError, lambda: cpu_grouped_mm.grouped_mm_bf16(x.float(), w, offs)),              # fp32 rows
        (TypeError, lambda: cpu_grouped_mm.grouped_mm_bf16(x, w, offs.long())),               # int64 offsets
        (ValueError, lambda: cpu_grouped_mm.grouped_mm_bf16(x, w[:, :, :6], offs)),           # K mismatch
        (ValueError, lambda: cpu_grouped_mm.grouped_mm_bf16(x[:, :7], w[:, :, :7], offs)),    # odd K
        (ValueError, lambda: cpu_grouped_mm.grouped_mm_bf16(x, w, torch.tensor([3, 9], dtype=torch.int32))),  # > S
        (ValueError, lambda: cpu_grouped_mm.grouped_mm_bf16(x, w, torch.tensor([5, 4], dtype=torch.int32))),  # down
        (ValueError, lambda: cpu_grouped_mm.grouped_mm_bf16(x, w[:1], offs)),                 # E mismatch
        (ValueError, lambda: cpu_grouped_mm.grouped_mm_bf16_data_grad(dy[:, :15], w, offs)),  # N mismatch
        (ValueError, lambda: cpu_grouped_mm.grouped_mm_bf16_weight_grad(dy[:7], x, offs)),    # rows mismatch
    ]
    for error, call in bad:
        with pytest.raises(error) as info:
            call()
        assert "\n" not in str(info.value), str(info.value)
