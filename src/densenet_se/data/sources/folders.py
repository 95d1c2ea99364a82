"""data.source=folders (the default): an ImageFolder tree, one sub-folder of data.root per class."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from densenet_se.data.sources.base import Listing, Source
from densenet_se.errors import UserError
from densenet_se.names import display_name


def _list_files(root: Path, labels: str | None, extensions: Sequence[str] | None) -> Listing:
    from densenet_se.data.images import scan_image_folder

    scan = scan_image_folder(root, extensions)
    if not scan.files:
        raise UserError(
            f"data.root={root} has no images in class sub-folders; expected {root}/<class>/<image>.jpg."
        )
    return Listing(
        scan.class_names,
        scan.files,
        scan.labels,
        origin=f"data.root={root}",
        classes_are="one sub-folder per class",
        class_where=[f"folder {display_name(str(root / name))}" for name in scan.class_names],
        drop_unreadable=True,  # a folder of unreadable files is skipped, as an empty one is
    )


SOURCE = Source(name="folders", config="imagefolder", labels=None, list_files=_list_files)
