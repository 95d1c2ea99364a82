"""Resume a run in its own directory with its own config (densenet_se.callbacks.SeedEachEpoch makes it match).

`python train.py resume=RUN_DIR` reads the run's config (`.hydra/config.yaml`), takes the RESUMABLE_KEYS
as its latest recorded session left them (`.hydra/resume-*/config.yaml`) and as the command line gives them,
and continues from `checkpoints/last.ckpt`. The original `.hydra/` files are never rewritten: each resumed
session that passed every check records its config and command line in `.hydra/resume-<time>/`. A run
directory may come from someone else: its config may instantiate only what our config groups define
(densenet_se.rundir), and a session record can only carry RESUMABLE_KEYS that pass the range checks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from densenet_se import backbones
from densenet_se.checkpoint import load_checkpoint
from densenet_se.data.split import SPLITS, read_split_file
from densenet_se.errors import UserError
from densenet_se.io import atomic_write_text
from densenet_se.overrides import override_key
from densenet_se.rundir import check_targets, check_tracking, load_run_yaml

log = logging.getLogger("densenet_se")

# What may differ from the original run: how long to train, where and on what it runs, where the data (and the
# list of its labels) lives. Everything that changes the model, the data split or the optimisation is fixed by the
# run being resumed; the split check holds a moved data.root or data.labels to the images and labels it started with.
RESUMABLE_KEYS = (
    "trainer.max_epochs",
    "trainer.min_epochs",
    "trainer.max_steps",
    "trainer.max_time",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.enable_progress_bar",
    "data.root",
    "data.labels",
    "data.num_workers",
    "data.pin_memory",
    "data.cache_dir",
    "paths.data_dir",
    "paths.cache_dir",
    "print_config",
    "test_after_fit",
)
SESSION_PREFIX = "resume-"


def checkpoint_path(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.ckpt"


def find_run_dir(resume: str | Path) -> Path:
    """The absolute run directory named by resume=..., checked to hold checkpoints/last.ckpt."""
    run_dir = Path(resume).expanduser()
    if not run_dir.is_dir():
        raise UserError(
            f"resume={resume}: there is no such run directory; give the folder of an earlier run "
            "(e.g. outputs/<date>/<time>)."
        )
    if not checkpoint_path(run_dir).is_file():
        raise UserError(
            f"resume={resume}: {checkpoint_path(run_dir)} does not exist, so there is nothing to resume "
            "(the run stopped before its first epoch ended); start it again without resume=."
        )
    return run_dir.resolve()


def hydra_run_dir(resume: str | None, default: str) -> str:
    """hydra.run.dir: RUN_DIR when resuming (checked before Hydra creates anything), else `default`."""
    return default if resume in (None, "") else str(find_run_dir(resume))


def session_records(run_dir: Path) -> list[Path]:
    """The config.yaml of every recorded resumed session, oldest first."""
    hydra_dir = run_dir / ".hydra"
    return sorted(p for p in hydra_dir.glob(f"{SESSION_PREFIX}*/config.yaml") if p.is_file())


def carried_values(run_dir: Path, base: DictConfig) -> dict[str, Any]:
    """The RESUMABLE_KEYS as the latest usable session record left them.

    A record that cannot be read, or whose values fail the range checks or would instantiate something, is
    skipped with a warning naming it: a bad record can neither block nor steer a later resume.
    """
    from densenet_se.config import validate

    for record in reversed(session_records(run_dir)):
        try:
            loaded = load_run_yaml(record)
            values = {k: OmegaConf.select(loaded, k) for k in RESUMABLE_KEYS if _has(loaded, k)}
            trial = base.copy()
            for key, value in values.items():
                OmegaConf.update(trial, key, value, merge=False, force_add=True)
            validate(trial)
            check_targets(trial, record, run_dir)
        except Exception as err:  # noqa: BLE001 - whatever is wrong with it, it is not used
            log.warning("ignoring the session record %s: %s", record.parent, str(err).strip().splitlines()[0])
            continue
        return values
    return {}


def _has(cfg: DictConfig, key: str) -> bool:
    return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False) is not _ABSENT


_ABSENT = object()


def resumed_config(composed: DictConfig, run_dir: Path, overrides: list[str]) -> DictConfig:
    """The run's own config with the RESUMABLE_KEYS given on the command line taken from `composed`."""
    from densenet_se.config import train_schema

    source = run_dir / ".hydra" / "config.yaml"
    if not source.is_file():
        raise UserError(
            f"resume={run_dir}: {source} is missing, so the run's settings are unknown; resume only runs "
            "started with train.py (their .hydra/ folder holds the config)."
        )
    changed = []
    for override in overrides:
        key = override_key(override)
        if key == "resume" or key.startswith("hydra."):
            continue
        if key not in RESUMABLE_KEYS:
            raise UserError(
                f"{key} cannot change when resuming: the run continues with its own config ({source}); "
                f"only {', '.join(RESUMABLE_KEYS)} may be given beside resume=, or start a new run."
            )
        changed.append(key)
    try:
        loaded = load_run_yaml(source)
        # Typed by its arch's schema; a run from before model.arch has none and is a densenet_se run.
        cfg = OmegaConf.merge(train_schema(loaded.get("model")), loaded)
    except UserError:
        raise
    except Exception as err:  # a hand-edited or foreign file
        raise UserError(f"resume={run_dir}: {source} is not a valid train config ({err}).") from None
    cfg.resume = str(run_dir)
    cfg.paths.output_dir = str(run_dir)
    # The weights come from last.ckpt: the pretrained source the config names (a file that may be gone, or
    # one placed in the run directory) is never read.
    cfg.model.pretrained = None
    check_targets(cfg, source, run_dir)
    for key, value in carried_values(run_dir, cfg).items():
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    for key in changed:
        OmegaConf.update(cfg, key, OmegaConf.select(composed, key), merge=False, force_add=True)
    check_targets(cfg, source, run_dir)  # again: the carried and command-line values are in now
    check_tracking(cfg, Path(composed.paths.root_dir).expanduser().resolve(), source, run_dir)
    return cfg


@dataclass
class ResumeSession:
    """What run() needs to continue a run: its directory, checkpoint and config."""

    run_dir: Path
    checkpoint: Path
    cfg: DictConfig
    overrides: list[str] = field(default_factory=list)
    epoch: int = 0  # epochs already finished
    from_command_line: bool = False

    def check_split(self, datamodule: Any) -> None:
        """Refuse to continue on other images than the run started with (its split.json)."""
        saved = self.run_dir / "split.json"
        if not saved.is_file():
            raise UserError(
                f"resume={self.run_dir}: {saved} is missing, so there is no record of which images this run "
                "trained and validated on; restore it from a copy of the run, or start a new run."
            )
        old = read_split_file(saved)
        new = json.loads(json.dumps(datamodule.split))
        check_labels(old, new, saved, datamodule)
        for name in ("class_names", "train", "val", "test"):
            if old.get(name) != new.get(name):
                raise UserError(
                    f"data.root={datamodule.root} no longer holds the images this run started with (its {name} "
                    f"differs from {saved}); restore them, or start a new run instead of resume=."
                )
        check_content(old, new, saved, datamodule.root)

    def record(self) -> None:
        """Write this session's config and command line to .hydra/resume-<time>/ (Hydra's own stay as they were).

        Called once the session has passed every check, just before training: a session that failed is not
        recorded, so its values are not carried into the next resume.
        """
        if not self.from_command_line:
            return  # resumed in-process with a config the caller built: no Hydra session to record
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
        folder = self.run_dir / ".hydra" / f"{SESSION_PREFIX}{stamp}"
        # Written beside it and renamed: a session record appears whole or not at all.
        staging = folder.with_name(f".{folder.name}.tmp")
        atomic_write_text(staging / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(self.overrides)))
        atomic_write_text(staging / "config.yaml", OmegaConf.to_yaml(self.cfg))
        staging.rename(folder)


def check_labels(old: dict, new: dict, saved: Path, datamodule: Any) -> None:
    """Refuse the same images under other classes than split.json records (an edited data.labels)."""
    from densenet_se.names import display_name

    def class_of(split: dict) -> dict[str, str]:
        names = split.get("class_names") or []
        return {
            rel: names[label] for key in SPLITS for rel, label in split.get(key, []) if label < len(names)
        }

    before, now = class_of(old), class_of(new)
    if not before or before.keys() != now.keys():
        return  # other files: the split check names that
    changed = [rel for rel in sorted(before) if before[rel] != now[rel]]
    if not changed:
        return
    where = (
        f"data.labels={datamodule.labels_file}" if datamodule.labels_file else f"data.root={datamodule.root}"
    )
    shown = ", ".join(f"{display_name(rel)} {before[rel]!r} now {now[rel]!r}" for rel in changed[:3])
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    raise UserError(
        f"{where} gives {len(changed)} of this run's images another class than it started with ({shown}{more}; "
        f"see {saved}); restore the labels, or start a new run instead of resume=."
    )


def check_content(old: dict, new: dict, saved: Path, root: Any) -> None:
    """Refuse images whose bytes differ from the content digests in the run's split.json."""
    from densenet_se.data.digests import changed_files
    from densenet_se.names import display_name

    if "digests" not in old:  # written before digests were recorded: names were all it could check
        log.warning("%s records no image digests (an older run); the images' content is not checked", saved)
        return
    try:
        changed = changed_files(old["digests"], new.get("digests", {}))
    except ValueError as err:
        raise UserError(f"{saved} is damaged ({err}); start a new run instead of resume=.") from None
    if changed:
        shown = ", ".join(display_name(rel) for rel in changed[:3]) + (
            f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        )
        raise UserError(
            f"data.root={root} holds other pictures under the names this run started with: {len(changed)} "
            f"image(s) changed since ({shown}; their content digests differ from {saved}); restore them, "
            "or start a new run instead of resume=."
        )


def _hydra_output_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    output_dir = OmegaConf.select(HydraConfig.get(), "runtime.output_dir")
    return Path(output_dir).resolve() if output_dir else None


def prepare_resume(cfg: DictConfig) -> ResumeSession:
    """Check resume=RUN_DIR and build the session: under train.py the run's own config, in-process `cfg` as given."""
    run_dir = find_run_dir(cfg.resume)
    output_dir = _hydra_output_dir()
    overrides: list[str] = []
    if output_dir is not None:  # started from the command line
        from hydra.core.hydra_config import HydraConfig

        if output_dir != run_dir:
            raise UserError(
                f"resume={cfg.resume} continues in its own directory; drop hydra.run.dir={output_dir}."
            )
        overrides = list(HydraConfig.get().overrides.task)
        cfg = resumed_config(cfg, run_dir, overrides)
    ckpt = checkpoint_path(run_dir)
    # Read (weights only) before the data is scanned: an unsafe or damaged file stops the run here.
    state = load_checkpoint(ckpt)
    check_layout(cfg, state["hyper_parameters"]["model"], ckpt)
    epoch = int(state.get("epoch", -1)) + 1
    return ResumeSession(run_dir, ckpt, cfg, overrides, epoch=epoch, from_command_line=output_dir is not None)


def check_layout(cfg: DictConfig, saved: dict[str, Any], ckpt: Path) -> None:
    """The weights only fit a model of the same arch and layout: model.arch and the arch's layout_keys that the
    checkpoint records must match the config's."""
    arch = cfg.model.get("arch", backbones.DEFAULT_ARCH)
    for key in ("arch", *backbones.get(saved["arch"]).layout_keys):
        value = arch if key == "arch" else _plain(cfg.model.get(key))
        if key in saved and value != saved[key]:
            raise UserError(
                f"model.{key}={value} does not match the checkpoint {ckpt} ({saved[key]}); resume with the "
                "run's own config."
            )


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
