"""Files named in a list someone else wrote (a labels CSV, a groups CSV, split.json): a bounded read, one sentence
naming the line of anything wrong, and the rule that a listed path stays inside data.root.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
from pathlib import PurePosixPath

from densenet_se.errors import UserError
from densenet_se.io import read_bounded

# A list larger than this is refused before it is read: ~1 M rows of path,label, far more images than a decoded
# cache holds (2,100 images at 224 px are 316 MB).
MAX_LIST_BYTES = 64 << 20


def relative_path(cell: str) -> str:
    """A path as a list writes it, in the posix form data.root's files have (`.\\A\\x.jpg` -> `A/x.jpg`)."""
    path = cell.strip().replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return path


def leaves_root(rel: str) -> bool:
    """True if `rel` cannot name a file inside the data folder: empty, absolute, with a NUL or going up with '..'."""
    parts = PurePosixPath(rel)
    return not rel or "\0" in rel or parts.is_absolute() or ".." in parts.parts


def read_list_text(path: str | os.PathLike[str], key: str, what: str) -> str:
    """The UTF-8 text (a BOM allowed) of the list file `key=path`, at most MAX_LIST_BYTES; UserError naming the
    file, and the line of a byte that is not UTF-8."""
    data = read_bounded(path, key, what, MAX_LIST_BYTES)
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(
            f"{key}={path} line {line} holds a byte that is not UTF-8 (0x{data[err.start]:02x}); save the file "
            f"as UTF-8 text, giving {what}."
        ) from None


def read_csv_rows(
    path: str | os.PathLike[str], key: str, columns: tuple[str, str], what: str
) -> list[tuple[int, str, str]]:
    """(line, relative path, value) of each row of a two-column CSV `path,<value>`, whose first row may be the
    header `columns`; blank rows are skipped. UserError naming the line of a row that is not two filled cells."""
    text = read_list_text(path, key, what)
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, str, str]] = []
    first = True
    line = 1  # where the row being read starts (a quoted cell may hold line breaks)
    try:
        for row in reader:
            if row and any(cell.strip() for cell in row):
                if first and [c.strip().lower() for c in row] == list(columns):
                    first = False
                elif len(row) != 2 or not row[0].strip() or not row[1].strip():
                    raise UserError(
                        f"{key}={path} line {line} is {','.join(row)!r}; each row must be "
                        f"{','.join(columns)} with both filled in (quote a path that holds a comma)."
                    )
                else:
                    first = False
                    rows.append((line, relative_path(row[0]), row[1].strip()))
            line = reader.line_num + 1
    except csv.Error as err:  # a field over csv's size limit
        raise UserError(f"{key}={path} line {line} cannot be read as CSV ({err}); give {what}.") from None
    return rows


def resolved_inside(top: str, rel: str) -> str | None:
    """The real path of `top/rel` (symbolic links followed) if it lies inside `top`, a resolved folder; else None."""
    real = os.path.realpath(os.path.join(top, rel))
    return real if real.startswith(top.rstrip(os.sep) + os.sep) else None
