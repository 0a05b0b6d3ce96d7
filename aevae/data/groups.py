"""Which files of a folder belong together (data.groups): the split keeps each group in one split, and the
test set's groups are its independent units. docs/data.md, "Groups"."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from aevae import AevaeError
from aevae.data.params import DataParams

# Where a group CSV may live: somewhere DVC sees it change. The prepare stage depends on data.path and on
# this folder (dvc.yaml); a CSV anywhere else could change without re-running prepare.
GROUPS_FOLDER = Path("data/groups")


@dataclass(frozen=True)
class Grouping:
    """The group of each file (relative posix path -> group name), and what it came from."""

    of: dict[str, str]
    by: str  # file | folder | the CSV's path
    csv_sha256: str | None = None


def group_files(params: DataParams, root: Path, files: list[Path]) -> tuple[list[Path], Grouping]:
    """The files to read (a CSV inside data.path is not an image) and the group of each."""
    names = [f.relative_to(root).as_posix() for f in files]
    if params.groups == "file":
        return files, Grouping({n: n for n in names}, "file")
    if params.groups == "folder":
        return files, Grouping({n: n.rpartition("/")[0] or "." for n in names}, "folder")
    table = _csv_path(params.groups, root)
    own = table.resolve().relative_to(root.resolve()).as_posix() if table.resolve().is_relative_to(root.resolve()) \
        else None
    kept = [(f, n) for f, n in zip(files, names, strict=True) if n != own]  # the CSV itself is no image
    return [f for f, _ in kept], _read_csv(table, root, {n for _, n in kept})


def _csv_path(value: str, root: Path) -> Path:
    table = Path(value)
    if not table.is_file():
        raise AevaeError(f"data.groups: {table} not found: write the CSV of path,group rows there (docs/data.md, "
                         "Groups), or set data.groups: file or folder")
    seen = (root.resolve(), GROUPS_FOLDER.resolve())
    if not any(table.resolve().is_relative_to(folder) for folder in seen):
        raise AevaeError(f"data.groups: {table} lies outside data.path ({root}) and {GROUPS_FOLDER}/, so DVC would "
                         f"not re-run prepare when it changes: move it into {GROUPS_FOLDER}/")
    return table


def _read_csv(table: Path, root: Path, names: set[str]) -> Grouping:
    """path,group rows covering exactly the files in `names`; the first bad row is a one-line error."""
    of: dict[str, str] = {}
    rows: dict[str, int] = {}
    with table.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not {"path", "group"} <= set(reader.fieldnames or ()):
            raise AevaeError(f"{table}: the first line must name the columns path and group (got "
                             f"{','.join(reader.fieldnames or ()) or 'an empty file'}): docs/data.md, Groups")
        for row in reader:
            where = f"{table}, line {reader.line_num}"
            path, group = (row["path"] or "").strip(), (row["group"] or "").strip()
            if not path or not group:
                raise AevaeError(f"{where}: a row needs a path and a group, got '{path},{group}'")
            if path in rows:
                raise AevaeError(f"{where}: {path} is listed twice (first on line {rows[path]}): keep one row per "
                                 "file")
            if path not in names:
                raise AevaeError(f"{where}: {path} is no file under data.path ({root}): paths are relative to "
                                 "data.path, hidden files and symlinked folders are not read")
            of[path], rows[path] = group, reader.line_num
    missing = sorted(names - of.keys())
    if missing:
        raise AevaeError(f"{table} has no row for {len(missing)} file(s) under data.path ({root}), the first "
                         f"{missing[0]}: add a row '{missing[0]},<group>' for each, or move them out of data.path")
    return Grouping(of, table.as_posix(), hashlib.sha256(table.read_bytes()).hexdigest())
