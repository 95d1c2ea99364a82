"""data.source=csv: the images and their classes from a CSV of path,label rows (data.labels), paths relative to
data.root, the way many medical sets ship (HAM10000's metadata, ISIC's ground truth)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from densenet_se.data.listed import read_csv_rows
from densenet_se.data.sources.base import Listing, Source, listing_from_rows

COLUMNS = ("path", "label")
WHAT = "a CSV of path,label rows (paths relative to data.root, like images/ISIC_0024306.jpg,nv)"


def _list_files(root: Path, labels: str | None, extensions: Sequence[str] | None) -> Listing:
    rows = read_csv_rows(labels or "", "data.labels", COLUMNS, WHAT)
    return listing_from_rows(root, rows, f"data.labels={labels}", extensions)


SOURCE = Source(name="csv", config="csv", labels=WHAT, list_files=_list_files)
