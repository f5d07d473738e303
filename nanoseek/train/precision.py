"""bf16 weights with fp32 master copies (``--dtype bf16-weights``), the mixed precision of Megatron-style
trainers, as opposed to autocast (``--dtype bf16``), which keeps fp32 weights and casts each one to bf16 in
every forward and each gradient back to fp32 in every backward.

The model's weights and gradients are bf16; the routers' centroids and balancing biases stay fp32 (see
``Router._apply``). The optimizer steps fp32 master copies of the bf16 weights:

- Gradients. A post-accumulate-grad hook takes each bf16 gradient off its weight as soon as autograd has
  accumulated it and sums it into the master's fp32 gradient, so gradient accumulation over micro-batches
  happens in fp32. With the fused step, the first micro-batch's gradient is kept as it is (bf16) and converted
  only if a second micro-batch comes.
- Clipping (``clip_grad_norm``): eager, torch's clip_grad_norm_ on the fp32 gradients; fused, the norm in fp32
  over the gradients as they are, and the step scales them.
- The step (``step``) is AdamW, with the optimizer's hyperparameters and its state (``exp_avg``, ``exp_avg_sq``,
  ``step``), so checkpoints and resumption see a plain ``torch.optim.AdamW``. Eager: the gradients become fp32
  master gradients, the optimizer steps, the bf16 weights are refreshed from the masters. With ``fused=True``
  (``nanoseek train --compile``): one torch.compile'd pass per weight reads its gradient (bf16 or fp32), the
  master and the moments, and writes the master, the moments and the bf16 weight; about 28 bytes per parameter
  against 40 for conversion + fused AdamW + refresh. On CPUs with AVX-512 bf16 that pass is a C++ kernel
  (csrc/master_adamw.cpp, the same arithmetic) where the tensors allow, as torch.compile's code for it is slower.
- Moments in bf16 (``states_dtype=torch.bfloat16``, ``nanoseek train --optimizer-states bf16``): DeepSeek-V3's
  low-precision optimizer states (V3 report §3.3.3: "BF16 instead of FP32 to track the first and second moments
  in the AdamW optimizer", the master weights and gradients staying FP32). The step computes in fp32 and stores
  the moments rounded to bf16: 4 bytes per parameter less memory, and 20 bytes of traffic per parameter in the
  fused step instead of 28 (the step is bound by memory bandwidth).

Checkpoints hold the fp32 masters, in the same format as the other modes, so a run resumes exactly and every
tool loads it; bf16 moments are saved as bf16 (torch's load_state_dict casts them to fp32, exactly; the next step
stores them in bf16 again).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .. import cpu_kernels

KERNEL_SOURCE = Path(__file__).parent / "csrc" / "master_adamw.cpp"


def adamw_update(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 weight: torch.Tensor | None, hyper: torch.Tensor) -> None:
    """One AdamW step of ``master`` (fp32, in place) as torch.optim.AdamW computes it, on ``grad`` (any float
    dtype) times the clipping factor, then ``weight`` (the low-precision copy) refreshed from it. The moments
    ``exp_avg`` and ``exp_avg_sq`` are fp32 or bf16 (DeepSeek-V3's, see MasterWeights). ``hyper``
    (fp32) = (lr, beta1, beta2, weight decay, eps, lr / bias correction 1, 1 / sqrt(bias correction 2), grad
    scale): a tensor, so that a new learning rate does not compile the step again."""
    lr, beta1, beta2, weight_decay, eps, step_size, inv_bias_correction2_sqrt, scale = hyper.unbind()
    g = grad.float() * scale
    master.mul_(1 - lr * weight_decay)  # decoupled weight decay
    # the moments in fp32: fp32 moments are updated in place (.float() is the tensor itself), bf16 ones are read,
    # updated in fp32 and stored rounded; this step uses the unrounded values
    m = exp_avg.float().lerp_(g, 1 - beta1)  # m = beta1 m + (1 - beta1) g
    v = exp_avg_sq.float().mul_(beta2).add_(g * g * (1 - beta2))  # v = beta2 v + (1 - beta2) g^2
    # (a multiplication by the reciprocal rather than a division: one division per element, not two)
    master.sub_(step_size * m / (v.sqrt() * inv_bias_correction2_sqrt + eps))
    if exp_avg.dtype != torch.float32:
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
    if weight is not None:
        weight.copy_(master)


def squared_norm(grad: torch.Tensor) -> torch.Tensor:
    """sum(grad^2) accumulated in fp32, whatever the gradient's dtype (compiled: one pass, no fp32 copy)."""
    g = grad.float()
    return (g * g).sum()


@functools.cache
def _kernel() -> ctypes.CDLL | None:
    """csrc/master_adamw.cpp: adamw_update as one pass of AVX-512 code (nanoseek.cpu_kernels; None elsewhere).
    torch.compile's code for it moves bf16 through half-filled, masked vectors: on one thread of the AMD EPYC of
    benchmarks/results, a 25 M-element step took 13.0 ms here against 19.9 ms compiled with fp32 moments, and
    9.7 against 44.1 ms with bf16 moments."""
    lib = cpu_kernels.library(KERNEL_SOURCE, "the fused AdamW kernel", "the master weights take torch.compile's step")
    if lib is None:
        return None
    ptr, c_int = ctypes.c_void_p, ctypes.c_int
    lib.nanoseek_master_adamw.argtypes = [ptr, ptr, c_int, ptr, ptr, c_int, ptr, ctypes.c_int64, ptr, c_int]
    lib.nanoseek_master_adamw.restype = None
    return lib


def _kernel_takes(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  weight: torch.Tensor | None) -> bool:
    """Whether the kernel can step these tensors: contiguous CPU tensors of one size, fp32 master, bf16 or fp32
    gradient and moments, bf16 weight."""
    tensors = [master, grad, exp_avg, exp_avg_sq] + ([weight] if weight is not None else [])
    return (all(t.device.type == "cpu" and t.is_contiguous() and t.numel() == master.numel() for t in tensors)
            and master.dtype == torch.float32 and exp_avg.dtype == exp_avg_sq.dtype
            and all(t.dtype in (torch.float32, torch.bfloat16) for t in (grad, exp_avg))
            and (weight is None or weight.dtype == torch.bfloat16) and _kernel() is not None)


def _kernel_update(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                   weight: torch.Tensor | None, hyper: torch.Tensor) -> None:
    """adamw_update by the kernel (see _kernel_takes), on torch's intra-op threads."""
    _kernel().nanoseek_master_adamw(
        master.data_ptr(), grad.data_ptr(), int(grad.dtype == torch.bfloat16), exp_avg.data_ptr(),
        exp_avg_sq.data_ptr(), int(exp_avg.dtype == torch.bfloat16), weight.data_ptr() if weight is not None else None,
        master.numel(), hyper.data_ptr(), cpu_kernels.threads())


@functools.cache
def _compiled_update():
    # one graph for every size (dynamic); a variant per gradient dtype and for weights without a low-precision copy
    return torch.compile(adamw_update, dynamic=True)


@functools.cache
def _compiled_squared_norm():
    # torch._foreach_norm(..., dtype=torch.float32) on bf16 gradients took 153 ms for the bench preset's experts
    # (10 tensors, 126 M elements), against 9 ms for this in one pass
    return torch.compile(squared_norm, dynamic=True)


class MasterWeights:
    """Cast ``model`` to ``dtype`` in place and keep fp32 master copies of the weights that were cast.
    ``fused``: step with the single-pass AdamW, the C++ kernel or torch.compile's (either needs a C++ compiler).
    ``states_dtype``: AdamW's moments in fp32 (torch's) or bf16 (DeepSeek-V3's)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16, fused: bool = False,
                 states_dtype: torch.dtype = torch.float32):
        if states_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"AdamW's moments are kept in float32 or bfloat16, not {states_dtype}")
        self.model = model
        self.fused = fused
        self.states_dtype = states_dtype
        fp32 = {id(p): p.detach().clone() for p in model.parameters() if p.dtype == torch.float32}
        model.to(dtype)
        self._named: list[tuple[str, nn.Parameter]] = []  # what the optimizer steps, by the model's names
        self._cast: list[tuple[nn.Parameter, nn.Parameter]] = []  # (low-precision weight, its fp32 master)
        self._weight_of: dict[int, nn.Parameter] = {}  # id(master) -> its low-precision weight
        self._pending: dict[int, torch.Tensor] = {}  # id(master) -> first micro-batch's gradient, not yet converted
        # id(master) -> its fp32 gradient memory, kept from step to step rather than a fresh fp32 tensor per weight
        # per step: bf16 steps of the bench preset took a median 0.917 s against 0.979 s (10 interleaved)
        self._buffers: dict[int, torch.Tensor] = {}
        self._grad_scale = 1.0  # clipping factor for the next step
        seen: set[int] = set()
        for name, p in model.named_parameters():
            if id(p) in seen:  # tied weights: one master
                continue
            seen.add(id(p))
            if p.dtype == torch.float32 or not p.requires_grad:  # kept in fp32 (routers): stepped directly
                self._named.append((name, p))
                continue
            master = nn.Parameter(fp32.pop(id(p)) if id(p) in fp32 else p.detach().float())
            p.register_post_accumulate_grad_hook(self._accumulate_into(master))
            self._cast.append((p, master))
            self._weight_of[id(master)] = p
            self._named.append((name, master))

    def _accumulate_into(self, master: nn.Parameter):
        pending = self._pending

        def hook(p: torch.Tensor) -> None:
            if master.grad is not None:
                master.grad.add_(p.grad)  # fp32 += bf16, in fp32
            elif self.fused and id(master) not in pending:
                pending[id(master)] = p.grad  # first micro-batch of a fused step: kept as the backward made it
            else:  # the eager step's fp32 gradient, or a second micro-batch of a fused step: held in fp32 from now on
                first = pending.pop(id(master), None)
                if id(master) not in self._buffers:
                    self._buffers[id(master)] = torch.empty_like(master)
                master.grad = self._buffers[id(master)].copy_(p.grad if first is None else first)
                if first is not None:
                    master.grad.add_(p.grad)
            p.grad = None
        return hook

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs for the optimizer: the fp32 masters and the parameters kept in fp32."""
        return iter(self._named)

    def gradient(self, param: nn.Parameter) -> torch.Tensor | None:
        """The gradient accumulated for an optimizer parameter: bf16 after one micro-batch, fp32 after more."""
        return param.grad if param.grad is not None else self._pending.get(id(param))

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> float:
        """Total 2-norm of the gradients (in fp32, as torch.nn.utils.clip_grad_norm_); the next ``step`` scales
        them by min(1, max_norm / (norm + 1e-6))."""
        if not self.fused:  # fp32 gradients: torch's own clipping (the step then has nothing left to scale)
            self._grad_scale = 1.0
            return float(torch.nn.utils.clip_grad_norm_([p for _, p in self._named], max_norm))
        grads = [g for _, p in self._named if (g := self.gradient(p)) is not None]
        squares = _compiled_squared_norm()
        # each gradient flat, (numel,), when contiguous
        norm = math.sqrt(sum(float(squares(g.view(-1) if g.is_contiguous() else g)) for g in grads))
        self._grad_scale = min(1.0, max_norm / (norm + 1e-6)) if math.isfinite(norm) else 1.0
        return norm

    @torch.no_grad()
    def step(self, optimizer: torch.optim.AdamW) -> None:
        """One AdamW step of the masters (and the fp32 parameters) with the clipping factor of the last
        ``clip_grad_norm``, then the low-precision weights refreshed from the masters."""
        if not self.fused and self.states_dtype == torch.float32:
            optimizer.step()
            self.copy_to_model()
            return
        update = _compiled_update() if self.fused else adamw_update  # eager bf16 moments: the same update
        for group in optimizer.param_groups:
            if group.get("amsgrad") or group.get("maximize"):
                raise ValueError("the fused master-weight step implements plain AdamW (no amsgrad, no maximize)")
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                grad = self.gradient(p)
                if grad is None:
                    continue
                state = optimizer.state[p]
                if not state:  # as torch.optim.AdamW initializes it, so either can continue the other's state
                    state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)
                    for key in ("exp_avg", "exp_avg_sq"):
                        state[key] = torch.zeros_like(p, dtype=self.states_dtype, memory_format=torch.preserve_format)
                for key in ("exp_avg", "exp_avg_sq"):  # a loaded state comes back in the master's dtype (fp32)
                    if state[key].dtype != self.states_dtype:
                        state[key] = state[key].to(self.states_dtype)
                state["step"] += 1
                step = float(state["step"])
                lr = float(group["lr"])
                hyper = torch.tensor([lr, beta1, beta2, group["weight_decay"], group["eps"],
                                      lr / (1 - beta1 ** step), 1 / math.sqrt(1 - beta2 ** step), self._grad_scale],
                                     dtype=torch.float32)
                tensors = [p, grad, state["exp_avg"], state["exp_avg_sq"], self._weight_of.get(id(p))]
                if self.fused and _kernel_takes(*tensors):
                    _kernel_update(*tensors, hyper)
                    continue
                if all(t is None or t.is_contiguous() for t in tensors):
                    # each flat (numel,): one compiled graph for all shapes
                    tensors = [t if t is None else t.view(-1) for t in tensors]
                update(*tensors, hyper)

    def zero_grad(self) -> None:
        """Drop the gradients, the pending bf16 ones included (in place of the optimizer's zero_grad)."""
        self._pending.clear()
        for _, p in self._named:
            p.grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Refresh the low-precision weights from the masters (after every optimizer step)."""
        if self._cast:
            torch._foreach_copy_([p for p, _ in self._cast], [m for _, m in self._cast])

    @contextlib.contextmanager
    def fp32_weights(self):
        """Within the block the model holds the fp32 masters (to save them); the bf16 weights come back after."""
        low = [p.data for p, _ in self._cast]
        for p, m in self._cast:
            p.data = m.data
        try:
            yield self.model
        finally:
            for (p, _), data in zip(self._cast, low):
                p.data = data
