"""What the data-integrity checks cost: content digests of the image files, and the verified disk cache.

Three tables, each a median of --repeats runs with the variants taking turns (so load from other processes
hits them alike), every ratio against a baseline measured in the same run:
1. hashing every file: reading alone, then BLAKE2b-128, SHA-1, SHA-256 (what the project uses, through
   file_digests) and xxh3-128 (only when the xxhash package is installed), one thread each;
2. a memory-cache setup: decoding every file from its path (before) vs reading each file once, hashing and
   decoding the same bytes (decode_files_with_digests, now);
3. loading a disk cache of the decoded images: torch.load with mmap plus one pass over the pixels (before),
   torch.load into memory, and the project's verified load (read shard by shard + a digest of each), plus the
   hash of the whole tensor alone with each algorithm;
4. one pass over every image with cache=none: decoding from the path vs reading, checking the file's digest
   against the one taken at setup and decoding those bytes (what FileImages does now).

    python benchmarks/integrity_cost.py --images-per-class 1050 --image-size 224   # ~2,100 JPEGs, 224 px
    python benchmarks/integrity_cost.py --root data/monkeypox --image-size 224
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _median_times(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per variant; variants take turns in each repeat, after one untimed warm-up each."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _table(title: str, medians: dict[str, float], baseline: str, unit: str = "ms") -> None:
    print(f"\n{title}")
    print(f"{'variant':<44} {'median ' + unit:>12} {'x ' + baseline:>16}")
    for name, seconds in medians.items():
        print(f"{name:<44} {seconds * 1000:>12.1f} {seconds / medians[baseline]:>16.2f}")


def hashing(root: Path, files: list[str], repeats: int) -> dict[str, float]:
    from densenet_se.data.digests import file_digests

    paths = [root / rel for rel in files]

    def each(fn: Callable[[bytes], object]) -> Callable[[], object]:
        return lambda: [fn(p.read_bytes()) for p in paths]

    variants: dict[str, Callable[[], object]] = {
        "read only (1 thread)": each(len),
        "blake2b-128 (1 thread)": each(lambda b: hashlib.blake2b(b, digest_size=16).digest()),
        "sha1 (1 thread)": each(lambda b: hashlib.sha1(b).digest()),
        "sha256 (1 thread)": each(lambda b: hashlib.sha256(b).digest()),
    }
    try:
        import xxhash

        variants["xxh3-128 (1 thread)"] = each(xxhash.xxh3_128_digest)
    except ImportError:
        print("(xxhash is not installed: no xxh3 row)")
    variants["file_digests: sha256-128 (used)"] = lambda: file_digests(root, files)
    return _median_times(variants, repeats)


def setup_cost(root: Path, files: list[str], size: int, repeats: int) -> dict[str, float]:
    from densenet_se.data.cache import decode_files_with_digests
    from densenet_se.data.digests import threads
    from densenet_se.data.images import BadImageError, decode_image

    def before() -> None:  # what decode_files did: PIL opens each path, nothing hashed
        def one(rel: str):
            try:
                return decode_image(root / rel, size)
            except BadImageError:
                return None

        with ThreadPoolExecutor(threads()) as pool:
            list(pool.map(one, files))

    variants = {
        "decode from paths (before)": before,
        "read once, hash + decode (now)": lambda: decode_files_with_digests(root, files, size, 89_478_485),
    }
    return _median_times(variants, repeats)


def cache_load(root: Path, files: list[str], size: int, repeats: int, work: Path) -> dict[str, float]:
    import torch

    from densenet_se.data import diskcache
    from densenet_se.data.cache import decode_files

    good, images, bad = decode_files(root, files, size, 89_478_485)
    names = [files[i] for i in good]
    old = work / "old.pt"
    torch.save({"version": 1, "files": names, "bad": [list(b) for b in bad], "images": images}, old)
    new = work / "new.u8"
    diskcache.save(new, "k", names, bad, images)
    print(f"\ncache of {len(names)} images at {size} px: {images.numel() / 2**20:.0f} MiB")

    def mmap_and_touch() -> None:  # the old load: lazy, the pixels page in during the first epoch
        entry = torch.load(old, map_location="cpu", weights_only=True, mmap=True)
        int(entry["images"].view(-1)[::4096].sum())  # one byte per page: every page read once

    variants = {
        "torch.load mmap + touch every page (before)": mmap_and_touch,
        "torch.load into memory": lambda: torch.load(old, map_location="cpu", weights_only=True),
        "verified load: read + sha256 per shard (now)": lambda: diskcache.load(new, "k", size, files),
    }
    flat = memoryview(images.numpy()).cast("B")
    for name, algorithm in (("blake2b", lambda: hashlib.blake2b(digest_size=16)), ("sha256", hashlib.sha256)):
        variants[f"hash of the tensor alone: {name}, 1 thread"] = lambda a=algorithm: a().update(flat)
    return _median_times(variants, repeats)


def uncached_reads(root: Path, files: list[str], size: int, repeats: int) -> dict[str, float]:
    import torch

    from densenet_se.data.cache import decode_files_with_digests
    from densenet_se.data.loaders import FileImages

    good, _, _, digests = decode_files_with_digests(root, files, size, 89_478_485)
    names = [files[i] for i in good]
    labels = torch.zeros(len(names), dtype=torch.long)
    plain = FileImages(root, names, labels, range(len(names)), size, 89_478_485)
    checked = FileImages(root, names, labels, range(len(names)), size, 89_478_485, [digests[i] for i in good])
    variants = {
        "decode every image (no check)": lambda: [plain[i] for i in range(len(plain))],
        "read, check the digest, decode (now)": lambda: [checked[i] for i in range(len(checked))],
    }
    return _median_times(variants, repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, help="an ImageFolder tree (default: generate the demo set)")
    parser.add_argument("--images-per-class", type=int, default=1050)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work-dir", type=Path, help="where generated images and cache files go")
    args = parser.parse_args(argv)

    from densenet_se.data.images import scan_image_folder

    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        work = Path(tmp)
        root = args.root
        if root is None:
            from densenet_se.data.demo import make_demo_dataset

            root = make_demo_dataset(work / "demo", args.images_per_class, args.image_size)
        files = scan_image_folder(root).files
        total = sum((root / rel).stat().st_size for rel in files)
        print(f"{len(files)} files, {total / 2**20:.1f} MiB, in {root}; medians of {args.repeats} repeats")
        _table("1. hashing every file", hashing(root, files, args.repeats), "read only (1 thread)")
        setup = setup_cost(root, files, args.image_size, args.repeats)
        _table("2. memory-cache setup", setup, "decode from paths (before)")
        load = cache_load(root, files, args.image_size, args.repeats, work)
        _table("3. disk cache load", load, "torch.load mmap + touch every page (before)")
        reads = uncached_reads(root, files, args.image_size, args.repeats)
        _table("4. an epoch with cache=none (one process)", reads, "decode every image (no check)")


if __name__ == "__main__":
    main()
