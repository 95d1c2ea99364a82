"""A run directory may come from someone else, be moved, or be resumed twice at once.

- What its config may instantiate on resume: only the targets our own config groups define (conf/callbacks,
  conf/logger), with the places they write inside the run directory.
- Where its MLflow logger may write: a file store inside the run directory or the default store of the command
  being run; a server only when MLFLOW_TRACKING_URI names it.
- One process at a time: a lock file held while a run writes into the directory.
- Its checkpoints' bookkeeping (ModelCheckpoint's best score and file names) follows the directory when it is
  moved or copied, and never names a file outside its checkpoints folder.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import lightning as L
from omegaconf import DictConfig, OmegaConf

from densenet_se.errors import UserError, shown
from densenet_se.paths import is_inside
from densenet_se.trackers import DEFAULT_STORE

try:  # advisory locks: POSIX only; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

# Config groups whose entries train.py instantiates from `_target_`.
TARGET_GROUPS = ("callbacks", "logger")
LOCK_FILE = ".lock"
# A run's .hydra/*.yaml and session records are a few KiB; 16 MiB leaves room for any real override list and
# bounds what a crafted file can make the YAML parser allocate.
MAX_RUN_YAML_BYTES = 16 << 20


def load_run_yaml(path: Path) -> Any:
    """A YAML file of a run directory, read only when at most MAX_RUN_YAML_BYTES (a run dir may come from anyone);
    UserError (one sentence naming the file) when it is bigger, unreadable or not YAML."""
    from densenet_se.io import read_bounded

    what = "the file train.py wrote there, or remove it"
    data = read_bounded(path, "", what, MAX_RUN_YAML_BYTES, name=f"run file {path}")
    try:
        return OmegaConf.create(data.decode("utf-8"))
    except Exception as err:  # noqa: BLE001 - not UTF-8, not YAML, or not a mapping/list
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"run file {path} is not valid YAML ({first}); give {what}.") from None


# ------------------------------------------------------------------------------------------------- targets
def config_dir() -> Path:
    """The primary config folder of this Hydra app (conf/), else the repository's."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        for source in HydraConfig.get().runtime.config_sources:
            if source.provider == "main" and source.schema == "file":
                return Path(source.path)
    return Path(__file__).resolve().parents[2] / "conf"


def allowed_targets(conf: Path) -> dict[str, dict[str, frozenset[str]]]:
    """{group: {target: the keys whose default names a place under ${paths.output_dir}}}, read from
    conf/<group>/*.yaml: the one list of what a resumed config may create is what the project ships."""
    allowed: dict[str, dict[str, frozenset[str]]] = {}
    for group in TARGET_GROUPS:
        found: dict[str, set[str]] = {}
        for file in sorted((conf / group).glob("*.yaml")):
            node = OmegaConf.to_container(OmegaConf.load(file), resolve=False)
            for entry in node.values() if isinstance(node, dict) else ():
                if isinstance(entry, dict) and isinstance(entry.get("_target_"), str):
                    places = {k for k, v in entry.items() if isinstance(v, str) and "paths.output_dir" in v}
                    found.setdefault(entry["_target_"], set()).update(places)
        allowed[group] = {target: frozenset(places) for target, places in found.items()}
    return allowed


def check_targets(cfg: DictConfig, source: Path, run_dir: Path, conf: Path | None = None) -> None:
    """UserError naming the key if the resolved `cfg` would instantiate anything our config groups do not
    define, or would write outside `run_dir` through one of their places (dirpath, save_dir)."""
    try:  # resolved: an interpolation (oc.decode) can make a node, and instantiate would resolve it too
        tree = OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # noqa: BLE001 - a hand-edited or foreign value
        raise UserError(
            f"resume={run_dir}: {source} holds a value that cannot be resolved ({_first_line(err)}); "
            "resume only runs started with train.py."
        ) from None
    allowed = allowed_targets(conf or config_dir())
    advice = f"remove it from {source} if you trust that file, or start a new run"
    for path, target in _targets(tree):
        key = ".".join(path)
        group = path[0] if len(path) == 3 and path[0] in TARGET_GROUPS else None
        if group is None:
            raise UserError(
                f"resume={run_dir}: {source} sets {key}={shown(target)}, but a resumed run creates only the "
                f"callbacks and loggers our config groups define (as {'/'.join(TARGET_GROUPS)}.<name>._target_); "
                f"{advice}."
            )
        if target not in allowed[group]:
            raise UserError(
                f"resume={run_dir}: {source} sets {key}={shown(target)}, which is not one of the {group} that "
                f"conf/{group}/ defines ({', '.join(sorted(allowed[group]))}), and a run directory may come from "
                f"someone else; {advice}."
            )
        entry = tree[group][path[1]]
        for place in sorted(allowed[group][target]):
            value = entry.get(place)
            if value is not None and not is_inside(str(value), run_dir):
                raise UserError(
                    f"resume={run_dir}: {source} sets {group}.{path[1]}.{place}={value}, outside the run "
                    f"directory, and a resumed run writes only inside it; {advice}."
                )


def check_tracking(cfg: DictConfig, root_dir: Path, source: Path, run_dir: Path) -> None:
    """UserError naming the key if a logger of the resumed `cfg` would write an MLflow store outside `run_dir`
    and `root_dir`/mlruns (the default store of the command being run), or send to a server that
    $MLFLOW_TRACKING_URI (your own setting) does not name."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    loggers = OmegaConf.to_container(cfg, resolve=True).get("logger") or {}
    for name, entry in loggers.items() if isinstance(loggers, dict) else ():
        if not isinstance(entry, dict) or "tracking_uri" not in entry:
            continue
        uri, key = entry.get("tracking_uri"), f"logger.{name}.tracking_uri"
        if not uri and env:
            continue  # your environment's store
        if not uri:
            uri, key = str(entry.get("save_dir") or DEFAULT_STORE), f"logger.{name}.save_dir"
        place = _file_store(str(uri))
        if place is None and uri == env:
            continue
        if place is None or not (is_inside(place, run_dir) or is_inside(place, root_dir / DEFAULT_STORE)):
            where = "a tracking server" if place is None else "outside the run directory"
            raise UserError(
                f"resume={run_dir}: {source} sets {key}={shown(uri, 300)}, {where}, and a run directory may come from "
                f"someone else, so a resumed run logs only inside it or to {root_dir / DEFAULT_STORE} (or to the "
                f"server MLFLOW_TRACKING_URI names); remove it from {source} if you trust that file, or start a "
                "new run."
            )


def _file_store(uri: str) -> str | None:
    """The local path an MLflow tracking URI writes (a path, file:, sqlite:), or None for a server."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return unquote(parsed.path) if parsed.scheme else uri
    if parsed.scheme == "sqlite":  # sqlite:///relative.db, sqlite:////absolute.db
        return unquote(parsed.path[1:]) or "."
    return None


def _targets(tree: Any) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(key path, value) of every `_target_` in a plain config tree."""
    stack: list[tuple[tuple[str, ...], Any]] = [((), tree)]
    while stack:
        path, node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            if key == "_target_":
                yield (*path, "_target_"), value
            else:
                stack.append(((*path, str(key)), value))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------------------------------------------- lock
@contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold RUN_DIR/.lock while a run writes there; UserError naming the holder if another process has it.

    An flock lives as long as its process: a run killed with SIGKILL leaves no stale lock behind. Only the
    process that writes shared files takes it (rank zero under DDP); the file itself is left in place.
    """
    from densenet_se.distributed import is_rank_zero

    if fcntl is None or not is_rank_zero():
        yield
        return
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(
            f"cannot create {path} ({err.strerror}); the run directory must be writable."
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip().splitlines()
            raise UserError(
                f"run directory {run_dir} is in use by {shown(holder[0], 300) if holder else 'another process'} "
                f"(it holds {path}); two runs writing one directory would record every epoch twice, so wait "
                "for that run to end or stop it, then try again."
            ) from None
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python"
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, f"process {os.getpid()} on {socket.gethostname()} since {stamp}: {command}\n".encode(), 0
        )
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# ------------------------------------------------------------------------------------------ checkpoint paths
class CheckpointPaths(L.Callback):
    """Point each ModelCheckpoint's restored state at its folder now, before Lightning restores it.

    Lightning restores the best score only when the checkpoint folder is where it was, so resuming a moved or
    copied run directory replaced best.ckpt with a worse epoch. It also deletes files the state names, so a
    name that is not a file directly in the recorded folder is refused.
    """

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        states = checkpoint.get("callbacks")
        if not isinstance(states, dict):
            return
        for callback in trainer.checkpoint_callbacks:
            state = states.get(callback.state_key)
            if isinstance(state, dict) and getattr(callback, "dirpath", None):
                relocate_state(state, str(callback.dirpath))


def relocate_state(state: dict, dirpath: str) -> None:
    """Rewrite a ModelCheckpoint state recorded in folder state["dirpath"] to `dirpath` (file names kept)."""
    old = state.get("dirpath")
    if not isinstance(old, str) or not old:
        return

    def moved(value: Any) -> Any:
        if value == "" or value is None:  # nothing recorded
            return value
        name = Path(value).name if isinstance(value, str) else ""
        if not name or name in (".", "..") or Path(value).parent != Path(old):
            raise UserError(
                f"the checkpoint being resumed records {shown(value, 300)} as one of its checkpoint files, which "
                f"is not a file in its checkpoints folder {old}; refusing to resume from a checkpoint that "
                "names files elsewhere (it may come from someone else)."
            )
        return str(Path(dirpath) / name)

    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if key in state:
            state[key] = moved(state[key])
    if isinstance(state.get("best_k_models"), dict):
        state["best_k_models"] = {moved(k): v for k, v in state["best_k_models"].items()}
    state["dirpath"] = dirpath
