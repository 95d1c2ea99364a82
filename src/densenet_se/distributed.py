"""Multi-process (DDP) helpers: this process's rank before the Trainer exists, and unpadded evaluation shards."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence, Sized
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported only where needed: entry points must report config errors fast
    from torch.utils.data import Sampler

log = logging.getLogger("densenet_se")

# Set by the launchers: torchrun (RANK), srun (SLURM_PROCID), jsrun (JSM_NAMESPACE_RANK).
_GLOBAL_RANK_KEYS = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def process_rank() -> tuple[int, int]:
    """(node rank, rank) of this process as its launcher set them in the environment; (0, 0) when alone.

    Lightning's own launcher starts extra processes on a node with LOCAL_RANK and NODE_RANK only, so the
    rank falls back to the local rank there; what matters to callers is whether both are zero.
    """
    for key in _GLOBAL_RANK_KEYS:
        if os.environ.get(key, "").isdigit():
            return 0, int(os.environ[key])
    node = os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or "0"
    local = os.environ.get("LOCAL_RANK") or "0"
    return (int(node) if node.isdigit() else 0), (int(local) if local.isdigit() else 0)


def is_rank_zero() -> bool:
    """True in the one process that writes shared files (the only process of a plain run)."""
    return process_rank() == (0, 0)


def rank_suffix() -> str:
    """'' for rank zero, else '.rank<R>' (or '.node<N>.rank<R>'): keeps every process's log file apart."""
    node, rank = process_rank()
    if (node, rank) == (0, 0):
        return ""
    return f".node{node}.rank{rank}" if node else f".rank{rank}"


def eval_sampler(dataset: Sized, trainer: Any) -> Sampler | None:
    """A validation/test sampler for DDP that hands every sample to exactly one process, or None if not needed.

    Lightning's default DistributedSampler pads the last shard with repeated samples so that every process
    runs as many batches as the others; metrics over the whole set would then count some images twice.
    Evaluation does not need equal shards (metrics and logged values sync once, at epoch end), as long as
    every process gets at least one sample.
    """
    world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
    if world <= 1:
        return None
    if len(dataset) < world:
        log.warning(
            "the evaluation split has %d images for %d processes; some are repeated so every process has one",
            len(dataset),
            world,
        )
        return None  # Lightning's padded sampler
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=trainer.global_rank, shuffle=False)


def eval_shard(indices: Sequence[int], trainer: Any) -> list[int] | None:
    """This process's share of `indices` for DDP evaluation, like eval_sampler (None: not needed)."""
    sampler = eval_sampler(indices, trainer)
    return None if sampler is None else [indices[i] for i in sampler]


def expected_processes(trainer_cfg: Any) -> int:
    """How many processes `trainer.*` asks for (devices x num_nodes), before any Trainer is built."""
    devices = trainer_cfg.get("devices", 1)
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        per_node = len(devices)
    elif str(devices).lstrip("-").isdigit() and int(devices) >= 0:
        per_node = int(devices)
    elif str(devices) in ("auto", "-1"):
        # Lightning's "auto" on a CPU is one process; on GPUs it is every visible GPU.
        if accelerator == "cpu":
            per_node = 1
        else:
            import torch

            per_node = max(1, torch.cuda.device_count())
    else:  # a string of GPU ids such as "0,1"
        per_node = len([d for d in str(devices).split(",") if d.strip()])
    return max(1, per_node) * max(1, int(trainer_cfg.get("num_nodes", 1) or 1))
