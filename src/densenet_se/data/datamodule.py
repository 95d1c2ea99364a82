"""ImageFolderDataModule: list (data.source), check, split and decode the images once, then serve uint8 batches."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from densenet_se.checks import Range, Rule, at_least, check
from densenet_se.data import cache as cache_lib
from densenet_se.data import diskcache, sources
from densenet_se.data import split as split_lib
from densenet_se.data.augment import TrainBatchTransform, check_legacy_augment
from densenet_se.data.digests import DIGEST_NAME, file_digests
from densenet_se.data.groups import (
    csv_groups_for,
    group_summary,
    groups_from_csv,
    groups_from_pattern,
    leakage_warning,
)
from densenet_se.data.images import (
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    normalize,
)
from densenet_se.data.loaders import CachedImages, DeviceBatches, FileImages
from densenet_se.data.split import SPLITS, check_folds, check_fractions, make_split, split_class_counts
from densenet_se.distributed import eval_sampler, eval_shard
from densenet_se.errors import UserError
from densenet_se.io import atomic_write_text
from densenet_se.names import display_name, file_list_text

log = logging.getLogger("densenet_se.data")

CACHE_MODES = ("none", "memory", "disk", "device")
BAD_FILE_MODES = ("skip", "error")
# Allowed values of the data.* settings (this module's arguments): checked here and by config.validate.
ALLOWED: dict[str, Rule] = {
    "cache": CACHE_MODES,
    "on_bad_file": BAD_FILE_MODES,
    "image_size": Range(
        lambda v: MIN_IMAGE_SIZE <= v <= MAX_IMAGE_SIZE, f"an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]"
    ),
    "batch_size": at_least(1),
    "num_workers": at_least(0),
    "max_image_pixels": at_least(1024),
    **split_lib.ALLOWED,
}


def allowed() -> dict[str, Rule]:
    """ALLOWED with data.source's registered names (found when first asked): what config.validate checks."""
    return {**ALLOWED, **sources.allowed()}


class ImageFolderDataModule(L.LightningDataModule):
    """The images a source lists (data.source: class sub-folders by default, or a CSV of path,label rows) as
    stratified train/val[/test] splits of uint8 batches.

    Loaders yield (uint8 images [N,3,S,S], int64 labels [N]); `on_after_batch_transfer` turns the images
    into ImageNet-normalised float32 on the device and augments them while training. With `folds` >= 2, val
    is fold `fold` of a stratified K-fold over the files outside the test split; with `group_pattern` or
    `groups`, the files of one source (augmented copies of a photo) always share a split and a fold.
    """

    def __init__(
        self,
        root: str = "data/monkeypox",
        source: str = sources.DEFAULT_SOURCE,
        labels: str | None = None,
        image_size: int = 224,
        batch_size: int = 32,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        split_seed: int = 428,
        num_workers: int = 0,
        cache: str = "memory",
        cache_dir: str | None = None,
        augment: bool | None = None,
        on_bad_file: str = "skip",
        demo: bool = False,
        output_dir: str | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        extensions: Sequence[str] | None = None,
        folds: int = 0,
        fold: int = 0,
        group_pattern: str | None = None,
        groups: str | None = None,
        augmentation: Mapping[str, Any] | None = None,
    ) -> None:
        """`augmentation`: the augment.* settings (densenet_se.data.augment); `augment` is the retired switch."""
        super().__init__()
        settings = dict(
            source=source,
            cache=cache,
            on_bad_file=on_bad_file,
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            max_image_pixels=max_image_pixels,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            folds=folds,
            fold=fold,
        )
        check(settings, allowed(), "data.")
        sources.check_labels(source, labels)
        check_legacy_augment(augment, (augmentation or {}).get("policy", "none"))
        check_fractions(float(val_fraction), float(test_fraction))
        check_folds(int(folds), int(fold))
        if group_pattern and groups:
            raise UserError(
                f"data.group_pattern='{group_pattern}' and data.groups={groups} are both set; "
                "give the groups one way, and set the other to null."
            )
        if group_pattern:
            try:
                re.compile(group_pattern)
            except re.error:
                groups_from_pattern([], group_pattern)  # raises the UserError that explains the pattern
        self.root = Path(root).expanduser()
        self.source = source
        self.labels_file = str(Path(labels).expanduser()) if labels else None  # data.labels
        self.image_size, self.batch_size = int(image_size), int(batch_size)
        self.val_fraction, self.test_fraction, self.split_seed = (
            float(val_fraction),
            float(test_fraction),
            int(split_seed),
        )
        self.num_workers, self.cache, self.on_bad_file = int(num_workers), cache, on_bad_file
        self.augmentation = dict(augmentation or {})
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else cache_lib.default_cache_dir()
        self.demo = bool(demo)
        self.output_dir = Path(output_dir) if output_dir else None
        self.pin_memory, self.persistent_workers = bool(pin_memory), bool(persistent_workers)
        self.max_image_pixels = int(max_image_pixels)
        self.extensions = list(extensions) if extensions is not None else None
        self.folds, self.fold = int(folds), int(fold)
        self.group_pattern = group_pattern or None
        self.groups = str(groups) if groups else None
        # filled by setup()
        self.class_names: list[str] = []
        self.num_classes = 0
        self.has_test = False
        self.split: dict = {}
        # How the split guards against leakage (metrics.json): grouped_split, groups, folds, fold, warning.
        self.split_report: dict = {}
        self.bad_files: list[tuple[str, str]] = []
        self.files: list[str] = []
        self.digests: list[str] = []  # content digest of each file in self.files
        self._labels = torch.empty(0, dtype=torch.long)
        self._images: torch.Tensor | None = None
        self._indices: dict[str, list[int]] = {}
        self._on_device: tuple[torch.device, torch.Tensor, torch.Tensor] | None = None
        self._train_transform: TrainBatchTransform | None = None

    # ---- preparing -------------------------------------------------------------------------------
    def _is_global_zero(self) -> bool:
        if self.trainer is not None:
            return self.trainer.is_global_zero
        # setup() called before a Trainer exists: the launcher's environment says (node rank included, which
        # Lightning's rank_zero_only misses on the other nodes of a hand-launched multi-node run).
        from densenet_se.distributed import is_rank_zero

        return rank_zero_only.rank == 0 and is_rank_zero()

    def _check_root(self) -> Path:
        if self.demo:
            from densenet_se.data.demo import ensure_demo_dataset

            return ensure_demo_dataset(self.root)
        if not self.root.exists():
            raise UserError(
                f"data.root={self.root} does not exist: set data.root=<folder with one sub-folder per class>,"
                " or run with experiment=demo to try the bundled synthetic data set."
            )
        if not self.root.is_dir():
            raise UserError(
                f"data.root={self.root} is a file; set data.root to a folder with one sub-folder per class."
            )
        return self.root

    def prepare_data(self) -> None:
        """Once per node before setup: generate the demo set and fill the disk cache, so ranks only read."""
        if self.split:  # already set up (the training app calls setup() before fit)
            return
        root = self._check_root()
        if self.cache == "disk":
            self._decoded(root, self._listing(root).files, fill_only=True)

    def _listing(self, root: Path) -> sources.Listing:
        """The images and classes data.source lists under `root`."""
        return sources.get(self.source).list_files(root, self.labels_file, self.extensions)

    def _decoded(
        self, root: Path, files: list[str], fill_only: bool = False
    ) -> tuple[list[int], torch.Tensor | None, list[tuple[str, str]], list[str]]:
        """(indices of good files, their uint8 images or None if cache="none", bad files, digest of each file).

        `fill_only` (prepare_data): only make sure a disk cache entry exists; setup() loads and verifies it.
        """
        if self.cache == "memory" or self.cache == "device":  # one read per file: hashed and decoded
            return cache_lib.decode_files_with_digests(root, files, self.image_size, self.max_image_pixels)
        digests = file_digests(root, files)
        if self.cache == "none":
            known = cache_lib.load_check_index(self.cache_dir, root, self.max_image_pixels)
            bad, results = cache_lib.check_files(root, files, digests, self.max_image_pixels, known)
            if results != known and self._is_global_zero():
                cache_lib.save_check_index(self.cache_dir, root, self.max_image_pixels, results)
            bad_set = {rel for rel, _ in bad}
            return [i for i, rel in enumerate(files) if rel not in bad_set], None, bad, digests
        key = cache_lib.cache_key(
            list(zip(files, digests, strict=True)), self.image_size, self.max_image_pixels
        )
        path = cache_lib.disk_cache_path(self.cache_dir, key, self.image_size)
        if fill_only and path.is_file():
            return [], None, [], digests
        entry = diskcache.load(path, key, self.image_size, files)
        if entry is not None:
            position = {rel: i for i, rel in enumerate(files)}
            return [position[rel] for rel in entry.files], entry.images, entry.bad, digests
        good, images, bad, _ = cache_lib.decode_files_with_digests(
            root, files, self.image_size, self.max_image_pixels, expected=digests
        )
        if self._is_global_zero():
            try:
                diskcache.save(path, key, [files[i] for i in good], bad, images)
            except OSError as err:  # a cache is optional: a full disk costs the next run a decode, no more
                log.warning("could not write the image cache %s (%s); the next run decodes again", path, err)
        return good, images, bad, digests

    def setup(self, stage: str | None = None) -> None:
        """List, check, split and decode; safe to call again (Lightning calls it once per stage)."""
        if self.split:
            return
        root = self._check_root()
        listing = self._listing(root)
        group_of = self._group_of(listing.files)  # before decoding: a bad pattern or CSV fails in a second
        good, images, bad, digests = self._decoded(root, listing.files)
        self._report_bad(root, bad, len(listing.files))
        if not good:
            raise UserError(f"data.root={root} has no readable images ({len(bad)} files could not be read).")
        class_names, labels = self._readable_classes(listing, good)
        self.files = [listing.files[i] for i in good]
        self.digests = [digests[i] for i in good]
        groups = None
        if group_of is not None:  # the CSV needs rows for the images in use only, not for unreadable ones
            groups = (
                csv_groups_for(self.files, group_of, self.groups)
                if self.groups
                else [group_of[f] for f in self.files]
            )
        split = make_split(
            self.files,
            labels,
            self.val_fraction,
            self.test_fraction,
            self.split_seed,
            groups=groups,
            folds=self.folds,
            fold=self.fold,
            class_names=class_names,
        )
        position = {rel: i for i, rel in enumerate(self.files)}
        self._indices = {name: [position[rel] for rel, _ in split[name]] for name in SPLITS}
        self._labels = torch.tensor(labels, dtype=torch.long)
        self._images = images
        self._root = root
        self.class_names, self.num_classes = class_names, len(class_names)
        self.has_test = bool(split["test"])
        counts = split_class_counts(split, self.num_classes)
        self.split = {
            "root": str(root),
            "source": self.source,
            "labels": self.labels_file,
            "class_names": class_names,
            **split,
            "counts": counts,
        }
        # What each image held when the run started: resume refuses a folder whose pictures changed.
        self.split["digest"] = DIGEST_NAME
        self.split["digests"] = dict(zip(self.files, self.digests, strict=True))
        self.split_report = self._report_split(labels, groups)
        self._warn_missing_classes(counts)
        self._write_split()

    def _readable_classes(self, listing: sources.Listing, good: list[int]) -> tuple[list[str], list[int]]:
        """(class names, label of each good file): classes with no readable image dropped (folders) or refused."""
        used = sorted({listing.labels[i] for i in good})
        for label in sorted(set(range(len(listing.class_names))) - set(used)):
            if listing.drop_unreadable:
                log.warning("ignoring %s: none of its images can be read", listing.class_where[label])
                continue
            count = listing.labels.count(label)
            raise UserError(
                f"{listing.class_where[label]} has no readable image (its {count} files cannot be read); fix "
                "them, or leave the class out."
            )
        # Labels renumbered over the classes left.
        relabel = {old: new for new, old in enumerate(used)}
        class_names = [listing.class_names[old] for old in used]
        if len(class_names) < 2:
            raise UserError(
                f"{listing.origin} has {len(class_names)} class(es) with readable images "
                f"({', '.join(class_names) or 'none'}); at least 2 are needed, {listing.classes_are}."
            )
        return class_names, [relabel[listing.labels[i]] for i in good]

    def _group_of(self, scanned: list[str]) -> dict[str, str] | None:
        """{file: source group} from data.group_pattern or data.groups, else None (not grouped)."""
        if self.group_pattern:
            return dict(zip(scanned, groups_from_pattern(scanned, self.group_pattern), strict=True))
        if self.groups:
            return groups_from_csv(self.groups, scanned)
        return None

    def _report_split(self, labels: list[int], groups: list[str] | None) -> dict:
        """State, in the log and for metrics.json, whether the split keeps the copies of a photo together."""
        folds = (
            f"; fold {self.fold} of {self.folds} is the validation split (data.val_fraction is not used)"
            if self.folds
            else ""
        )
        if self.folds and self.has_test:
            folds += ", the test split is the same for every fold"
        report: dict = {"grouped_split": groups is not None, "groups": None, "folds": self.folds}
        report["fold"] = self.fold if self.folds else None
        report["leakage_warning"] = None
        if groups is None:
            log.info("split: not grouped: images are assigned one by one%s", folds)
            report["leakage_warning"] = leakage_warning(self.files)
            if report["leakage_warning"]:
                log.warning("%s", report["leakage_warning"])
            return report
        key, value = ("group_pattern", self.group_pattern) if self.group_pattern else ("groups", self.groups)
        summary = group_summary(labels, groups, self.class_names)
        mixed = summary.pop("mixed_class")
        report["groups"] = {"by": f"data.{key}", "value": value, **summary, "mixed_class": len(mixed)}
        per_class = ", ".join(f"{display_name(name)} {n}" for name, n in summary["per_class"].items())
        log.info(
            "split: grouped by data.%s='%s': %d source groups (%s), each kept whole in one split%s",
            key,
            value,
            summary["count"],
            per_class,
            " and one fold" + folds if self.folds else "",
        )
        if mixed:
            log.warning(
                "%d source groups hold images of more than one class (e.g. %s); each is kept in one split, "
                "but check data.%s: copies of one photo should share a class",
                len(mixed),
                ", ".join(repr(g) for g in mixed[:3]),
                key,
            )
        return report

    def _warn_missing_classes(self, counts: dict[str, list[int]]) -> None:
        for name in ("val", "test"):
            if name == "test" and not self.has_test:
                continue
            missing = [display_name(c) for c, n in zip(self.class_names, counts[name], strict=True) if n == 0]
            if missing:
                fix = "lower data.folds" if name == "val" and self.folds else f"raise data.{name}_fraction"
                log.warning(
                    "the %s split has no images of class %s (too few): %s or add images",
                    name,
                    ", ".join(missing),
                    fix,
                )

    def _report_bad(self, root: Path, bad: list[tuple[str, str]], total: int) -> None:
        self.bad_files = [(str(root / rel), reason) for rel, reason in bad]
        if not bad:
            return
        listing = None
        if self.output_dir is not None:
            listing = self.output_dir / "bad_files.txt"
            if self._is_global_zero():
                atomic_write_text(listing, file_list_text(self.bad_files))
        if self.on_bad_file == "error":
            shown = "; ".join(f"{display_name(p)}: {r}" for p, r in self.bad_files[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise UserError(
                f"data.root={root} has {len(bad)} unreadable image files ({shown}{more}); "
                "fix or remove them, or set data.on_bad_file=skip to leave them out."
            )
        first = self.bad_files[0]
        where = f"listed in {listing}" if listing else f"first: {display_name(first[0])}: {first[1]}"
        log.warning("skipped %d of %d image files that cannot be read (%s)", len(bad), total, where)

    def _write_split(self) -> None:
        if self.output_dir is None or not self._is_global_zero():
            return
        # One [path, label] pair (or "path": group / fold) per line keeps split.json readable and diffable.
        bulky = (*SPLITS, "fold_index", "groups", "digests")
        items = [(k, json.dumps(v)) for k, v in self.split.items() if k not in bulky]
        for key in SPLITS:
            rows = [json.dumps(pair) for pair in self.split[key]]
            items.append((key, "[\n" + ",\n".join(f"    {r}" for r in rows) + "\n  ]" if rows else "[]"))
        for key in ("fold_index", "groups", "digests"):
            if key in self.split:
                rows = [f"{json.dumps(p)}: {json.dumps(v)}" for p, v in self.split[key].items()]
                items.append((key, "{\n" + ",\n".join(f"    {r}" for r in rows) + "\n  }" if rows else "{}"))
        body = ",\n".join(f"  {json.dumps(key)}: {value}" for key, value in items)
        atomic_write_text(self.output_dir / "split.json", "{\n" + body + "\n}\n")

    # ---- loaders ---------------------------------------------------------------------------------
    def _require_setup(self) -> None:
        if not self.split:
            self.setup()

    def _device(self) -> torch.device:
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cpu")

    def _dataset(self, name: str) -> Dataset:
        indices = self._indices[name]
        if self._images is None:
            return FileImages(
                self._root,
                self.files,
                self._labels,
                indices,
                self.image_size,
                self.max_image_pixels,
                digests=self.digests,
            )
        return CachedImages(self._images, self._labels, indices)

    def _loader(self, name: str, shuffle: bool):
        self._require_setup()
        if name == "test" and not self.has_test:
            raise UserError(
                "there is no test split: set data.test_fraction (e.g. 0.1) to hold out a test set."
            )
        n = len(self._indices[name])
        world = int(getattr(self.trainer, "world_size", 1) or 1) if self.trainer is not None else 1
        per_process = -(-n // world)  # DDP's training sampler gives each process ceil(n / world) images
        # A last training batch of one image breaks BatchNorm ("Expected more than 1 value per channel").
        drop_last = shuffle and per_process % self.batch_size == 1 and per_process > 1
        # Decoded images in this process with no workers to feed: whole batches are indexed out of the tensor
        # (one index_select per batch) instead of item by item and collated, which costs per image per epoch.
        in_process = self._images is not None and self.num_workers == 0 and not self.pin_memory
        if self.cache == "device" or in_process:
            if self.cache == "device":
                device = self._device()
                if self._on_device is None or self._on_device[0] != device:
                    assert self._images is not None
                    self._on_device = (device, self._images.to(device), self._labels.to(device))
                _, images, labels = self._on_device
            else:
                images, labels = self._images, self._labels
            world = self.trainer.world_size if self.trainer is not None else 1
            rank = self.trainer.global_rank if self.trainer is not None else 0
            indices = self._indices[name]
            shard = None if shuffle else eval_shard(indices, self.trainer)
            if shard is not None:  # DDP evaluation: this process's images only, none repeated
                indices, rank, world = shard, 0, 1
            return DeviceBatches(images, labels, indices, self.batch_size, shuffle, drop_last, rank, world)
        generator = None
        if shuffle:  # seeded from torch's global RNG, i.e. by Lightning's seed_everything
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        dataset = self._dataset(name)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            # DDP validation/test: every image on exactly one process (Lightning's sampler pads with repeats).
            sampler=None if shuffle else eval_sampler(dataset, self.trainer),
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            generator=generator,
        )

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)

    def split_images(self, name: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(uint8 images [n,3,S,S], labels [n], relative paths) of a whole split, from the cache or decoded now.

        For reports after training: every image once, in this process, whatever the loaders' sharding.
        """
        self._require_setup()
        indices = self._indices[name]
        paths = [self.files[i] for i in indices]
        labels = self._labels[indices]
        if self._images is not None:
            return self._images[indices], labels, paths
        good, images, _ = cache_lib.decode_files(self._root, paths, self.image_size, self.max_image_pixels)
        return images, labels[good], [paths[i] for i in good]  # a file unreadable since setup is left out

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """uint8 images to normalised float32 on the device; while training, augmented (and mixed) as set."""
        if isinstance(batch, torch.Tensor):
            # A bare image tensor (the model summary's example input, predict batches): float passes through.
            return batch if batch.is_floating_point() else normalize(batch)
        images, labels = batch
        training = self.trainer is not None and self.trainer.training
        if training and self.augmentation:
            if self._train_transform is None:
                self._train_transform = TrainBatchTransform(
                    self.augmentation, self.image_size, self.num_classes
                )
            if not self._train_transform.is_identity:
                return self._train_transform(images, labels)
        return normalize(images), labels

    def teardown(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self._on_device = None  # free the device copy; the host cache stays for a later stage
