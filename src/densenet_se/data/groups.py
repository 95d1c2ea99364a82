"""Source groups of files (`data.group_pattern`, `data.groups`), their summary, and spotting augmented copies.

Augmented data sets hold several copies of one source photo; a split that puts copies on both sides leaks
and reads far better than the truth. Files with the same group id always share a split and a fold.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from densenet_se.data.listed import read_csv_rows
from densenet_se.errors import UserError

_EXAMPLE = "Monkeypox/M01_01_aug3.jpg"


def _examples(paths: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(repr(p) for p in paths[:n])
    return shown + (f" and {len(paths) - n} more" if len(paths) > n else "")


def groups_from_pattern(files: Sequence[str], pattern: str) -> list[str]:
    """The group id of each file: the first capture group (else the whole match) of `pattern` in its path.

    Paths are relative to data.root in posix form (`Monkeypox/M01_01_aug3.jpg`); `re.search` is used, so the
    pattern may match anywhere. Every file must get a non-empty id, or the sources of the others could leak.
    """
    try:
        regex = re.compile(pattern)
    except re.error as ex:
        raise UserError(
            f"data.group_pattern='{pattern}' is not a valid regular expression ({ex}); "
            "give one whose first (...) group captures the source id, e.g. '([^/]+?)(?:_aug\\d+)?\\.\\w+$'."
        ) from None
    ids: list[str] = []
    unmatched: list[str] = []
    for path in files:
        match = regex.search(path)
        found = (match.group(1) if regex.groups else match.group(0)) if match else None
        if found:
            ids.append(found)
        else:
            unmatched.append(path)
    if unmatched and len(unmatched) == len(files):
        raise UserError(
            f"data.group_pattern='{pattern}' matches none of the {len(files)} images (e.g. "
            f"{_examples(unmatched, 2)}); it is searched in each path relative to data.root, like "
            f"{_EXAMPLE!r}, and its first (...) group is the source id."
        )
    if unmatched:
        raise UserError(
            f"data.group_pattern='{pattern}' gives no source id for {len(unmatched)} of the {len(files)} "
            f"images ({_examples(unmatched)}); widen it so every image gets one (an optional part is written "
            "(?:...)?), otherwise copies of one photo could land on both sides of the split."
        )
    return ids


def read_groups_csv(csv_path: str | Path) -> dict[str, tuple[str, int]]:
    """{relative path: (group, line number)} from a CSV of `path,group` rows (an optional header row)."""
    what = f"a CSV file of path,group rows (paths relative to data.root, like {_EXAMPLE})"
    rows: dict[str, tuple[str, int]] = {}
    for number, rel, group in read_csv_rows(csv_path, "data.groups", ("path", "group"), what):
        if rel in rows and rows[rel][0] != group:
            raise UserError(
                f"data.groups={csv_path} gives {rel!r} two groups ({rows[rel][0]!r} on line {rows[rel][1]}, "
                f"{group!r} on line {number}); keep one row per image."
            )
        rows[rel] = (group, number)
    return rows


def groups_from_csv(csv_path: str | Path, known: Iterable[str]) -> dict[str, str]:
    """{relative path: group} from `csv_path`; every row must name a file in `known` (the folder's images)."""
    rows = read_groups_csv(csv_path)
    known_set = set(known)
    unknown = sorted((line, rel) for rel, (_, line) in rows.items() if rel not in known_set)
    if unknown:
        shown = [f"{rel} (line {line})" for line, rel in unknown]
        raise UserError(
            f"data.groups={csv_path} names {len(unknown)} files that are not images under data.root "
            f"({_examples(shown)}); paths are relative to data.root, like {_EXAMPLE}."
        )
    return {rel: group for rel, (group, _) in rows.items()}


def csv_groups_for(files: Sequence[str], groups: dict[str, str], csv_path: str | Path) -> list[str]:
    """The group of each of `files` (the images in use); one without a row in the CSV is an error."""
    missing = [rel for rel in files if rel not in groups]
    if missing:
        raise UserError(
            f"data.groups={csv_path} has no row for {len(missing)} of the {len(files)} images "
            f"({_examples(missing)}); give every image a group (a photo without copies can be its own)."
        )
    return [groups[rel] for rel in files]


def group_summary(labels: Sequence[int], groups: Sequence[str], class_names: Sequence[str]) -> dict:
    """{"count", "per_class" {class: groups holding it}, "mixed_class": [groups holding several classes]}."""
    classes_of: dict[str, set[int]] = defaultdict(set)
    for label, group in zip(labels, groups, strict=True):
        classes_of[str(group)].add(int(label))
    per_class = Counter(c for held in classes_of.values() for c in held)
    return {
        "count": len(classes_of),
        "per_class": {name: per_class.get(c, 0) for c, name in enumerate(class_names)},
        "mixed_class": sorted(g for g, held in classes_of.items() if len(held) > 1),
    }


# ---- spotting augmented copies ---------------------------------------------------------------------------
# Words that augmentation scripts append to a file's stem (`img12_flip`, `M01_01_aug3`, `photo (2)`). Bare
# numbers are left out on purpose: cameras number distinct photos the same way (`IMG_0001`).
_WORDS = (
    "aug|augmented|augment|flip|flipped|hflip|vflip|fliplr|flipud|mirror|mirrored|rot|rotate|rotated|"
    "rotation|crop|cropped|zoom|zoomed|shift|shifted|scale|scaled|shear|sheared|bright|brightness|dark|"
    "contrast|noise|noisy|blur|blurred|gamma|translate|translated|transl|copy|jitter|sharpen|affine|"
    "elastic|perspective|warp|cutout|gauss|gaussian"
)
_TOKEN = re.compile(rf"(?P<sep>[ _-])(?:(?P<word>{_WORDS})(?P<inner>[_-]?)\d*|\(\d+\))$", re.IGNORECASE)


def _strip_augmentation(stem: str) -> tuple[str, list[tuple[str, str, str]]]:
    """(stem without trailing augmentation tokens, [(separator, word or '(n)', separator before digits)])."""
    tokens: list[tuple[str, str, str]] = []
    while True:
        match = _TOKEN.search(stem)
        if match is None or match.start() == 0:
            return stem, tokens
        tokens.append((match["sep"], match["word"] or "(n)", match["inner"] or ""))
        stem = stem[: match.start()]


def suggest_group_pattern(files: Sequence[str]) -> str | None:
    """A data.group_pattern for names that look like augmented copies, or None when they do not.

    The names look augmented when at least 4 files, and 5% of all, end in an augmentation word (`_aug3`,
    `_flip`, `_rot90`, ` (2)`) and share their remaining stem with another file. The suggestion is checked:
    it matches every file and joins those copies.
    """
    stems: list[str] = []
    seen: list[tuple[str, str, str]] = []
    tagged: list[bool] = []
    for path in files:
        name = path.rsplit("/", 1)[-1]
        stem = name.rsplit(".", 1)[0] if "." in name else name
        base, tokens = _strip_augmentation(stem)
        stems.append(base)
        seen.extend(tokens)
        tagged.append(bool(tokens))
    sizes = Counter(stems)
    copies = sum(1 for stem, is_tagged in zip(stems, tagged, strict=True) if is_tagged and sizes[stem] > 1)
    if copies < max(4, 0.05 * len(files)):
        return None
    words = sorted({w for _, w, _ in seen if w != "(n)"})
    numbered = r"[_-]?\d*" if any(inner for _, _, inner in seen) else r"\d*"
    joined = "|".join(re.escape(w) for w in words)
    alternatives = [(f"(?:{joined})" if len(words) > 1 else joined) + numbered] if words else []
    if any(w == "(n)" for _, w, _ in seen):
        alternatives.append(r"\(\d+\)")
    seps = sorted({s for s, _, _ in seen})
    # Space, '_' and '-' need no escape outside a class; inside one '-' goes last.
    sep = seps[0] if len(seps) == 1 else "[" + "".join(sorted(seps, key=lambda s: s == "-")) + "]"
    body = alternatives[0] if len(alternatives) == 1 else f"(?:{'|'.join(alternatives)})"
    pattern = rf"([^/]+?)(?:{sep}{body})*\.\w+$"
    try:
        ids = groups_from_pattern(files, pattern)
    except UserError:
        return None
    return pattern if len(set(ids)) < len(files) else None


def leakage_warning(files: Sequence[str]) -> str | None:
    """One line suggesting data.group_pattern when the names look like augmented copies, else None."""
    pattern = suggest_group_pattern(files)
    if pattern is None:
        return None
    ids = groups_from_pattern(files, pattern)
    return (
        f"{len(files)} images but only {len(set(ids))} distinct names once suffixes like "
        f"{_suffix_example(files)} are removed: they look like augmented copies of fewer photos, and a "
        "split that puts copies of one photo on both sides reads far too well; keep them together with "
        f"\"data.group_pattern='{pattern}'\" (or data.groups=<csv of path,group>)."
    )


def _suffix_example(files: Sequence[str]) -> str:
    for path in files:
        name = path.rsplit("/", 1)[-1]
        stem = name.rsplit(".", 1)[0] if "." in name else name
        base, tokens = _strip_augmentation(stem)
        if tokens:
            return repr(stem[len(base) :])
    return "'_aug1'"
