"""The OmegaConf resolvers that conf/hydra/*.yaml uses, in one place, registered by whoever composes a config.

`python train.py` (densenet_se.cli.hydra_entry) calls `register()` before Hydra composes; a submitit job calls
it when it unpickles the entry point's job (cli.HydraJob); code that composes conf/ itself calls it first.
Torch-free: a config error is reported before torch loads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import OmegaConf

from densenet_se import distributed
from densenet_se.sweep import job_dir_name, slurm_gpus, slurm_tasks


def resume_run_dir(resume: str | None, default: str) -> str:
    """hydra.run.dir: RUN_DIR when resuming (checked to hold checkpoints/last.ckpt), else `default`."""
    if resume in (None, ""):  # a new run: no need to load the resume machinery (torch, Lightning)
        return default
    from densenet_se.resume import hydra_run_dir  # imported late: it needs torch and Lightning

    return hydra_run_dir(resume, default)


def resume_output_subdir(resume: Any) -> str | None:
    """`.hydra` for a new run; none when resuming (the original is kept) or in a non-zero DDP rank."""
    return ".hydra" if resume in (None, "") and distributed.is_rank_zero() else None


# name in `${name:...}` -> function
RESOLVERS: dict[str, Callable[..., Any]] = {
    "resume_run_dir": resume_run_dir,  # hydra.run.dir (resume=RUN_DIR)
    "resume_output_subdir": resume_output_subdir,  # hydra.output_subdir
    "job_dir_name": job_dir_name,  # hydra.sweep.subdir
    "rank_suffix": distributed.rank_suffix,  # the log file of each DDP process
    "slurm_tasks": slurm_tasks,  # conf/hydra/launcher/slurm.yaml
    "slurm_gpus": slurm_gpus,
}


def register() -> None:
    """Register every resolver of RESOLVERS with OmegaConf (idempotent)."""
    for name, resolver in RESOLVERS.items():
        OmegaConf.register_new_resolver(name, resolver, replace=True)
