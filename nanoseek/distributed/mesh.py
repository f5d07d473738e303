"""The parallel layout of a job: EP x PP x DP = world size, as a ``torch.distributed`` device mesh.

Mesh dimensions, outermost first: ``pp`` (pipeline stages), ``dp`` (data-parallel replicas), ``ep`` (expert
parallel ranks, innermost so that an EP group is a block of neighbouring ranks, i.e. one node as in V3).

Ranks of one EP group hold different experts but run attention and the dense layers on *different data*,
like data-parallel ranks: the data is split over ``dp x ep`` ranks (the "data" group). So
- non-expert parameters are replicated over the data group: their gradients are averaged over it;
- routed-expert parameters are sharded over ``ep`` and replicated over ``dp``: their gradients (which
  already hold every EP peer's tokens, through the all-to-all backward) are summed over ``dp`` and divided by
  the data-group size;
- ZeRO-1 shards the optimizer state over ``dp``, whose ranks hold the same parameters.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config import ModelConfig

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Layout:
    ep: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def world_size(self) -> int:
        return self.ep * self.pp * self.dp

    def __str__(self) -> str:
        return f"EP={self.ep} x PP={self.pp} x DP={self.dp}"

    def validate(self, world_size: int, model: ModelConfig | None = None) -> None:
        """One-line ValueErrors for layouts that cannot run (the pipeline checks its own stage split)."""
        for name in ("ep", "pp", "dp"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"--{name} must be a positive integer, got {v!r}")
        if self.world_size != world_size:
            hint = f": give the layout, e.g. --dp {world_size}" if self.world_size == 1 else ""
            raise ValueError(f"--ep {self.ep} x --pp {self.pp} x --dp {self.dp} = {self.world_size} "
                             f"rank{'s' if self.world_size > 1 else ''}, but the job has {world_size} (torchrun "
                             f"--nproc-per-node x --nnodes){hint}")
        if model is not None and self.ep > 1:
            if not model.has_moe:  # no routed experts, or only dense layers and no MoE MTP block
                raise ValueError(f"--ep {self.ep}: the model has no MoE layer, no routed experts to split")
            if model.n_routed_experts % self.ep:
                raise ValueError(f"--ep {self.ep} does not divide the model's {model.n_routed_experts} routed experts")


@dataclass
class ParallelContext:
    """This rank's place in the layout and the process groups it talks to."""

    layout: Layout
    mesh: DeviceMesh
    rank: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    ep_group: dist.ProcessGroup
    data_group: dist.ProcessGroup  # dp x ep: ranks that see different data

    @property
    def data_size(self) -> int:
        return self.layout.dp * self.layout.ep

    @property
    def data_rank(self) -> int:
        return self.dp_rank * self.layout.ep + self.ep_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_parallel(layout: Layout, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelContext:
    """Join the process group (NCCL on CUDA, gloo on CPU; collectives time out after ``timeout_s`` so a dead
    or hung rank ends the job with an error) and build the ``(pp, dp, ep)`` device mesh."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    layout.validate(dist.get_world_size())
    mesh = init_device_mesh(device.type, (layout.pp, layout.dp, layout.ep), mesh_dim_names=("pp", "dp", "ep"))
    data_mesh = mesh["dp", "ep"]._flatten("data")
    coords = mesh.get_coordinate()
    return ParallelContext(layout=layout, mesh=mesh, rank=dist.get_rank(), pp_rank=coords[0], dp_rank=coords[1],
                           ep_rank=coords[2], pp_group=mesh.get_group("pp"), dp_group=mesh.get_group("dp"),
                           ep_group=mesh.get_group("ep"), data_group=data_mesh.get_group())
