"""INPUT arguments of `vlm batch` -> rows.

    photo.jpg, shots/, 'shots/*.png', https://...   as `vlm describe` takes them (vlmcli.inputs)
    s3://bucket/shots/, gs://..., file:///...       an object-store file, or the images under a prefix
    list.txt                                        a manifest: one path or URL a line ('#' comments)
    list.jsonl                                      a manifest: {"image": ..., "id": ..., "prompt": ...} a line
    list.parquet                                    a manifest: columns image, and optionally id and prompt

A row's id is the manifest's `id` where it has one, else the image as written; ids must be
unique, since --resume tells rows apart by them. Relative paths in a manifest are relative
to the manifest's folder (so a manifest travels with its images), as in a playlist.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from vlmcli import inputs
from vlmcli.errors import UsageError, VlmError

MANIFEST_SUFFIXES = (".txt", ".jsonl", ".parquet")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class Row:
    id: str
    image: str  # as written: what the output's `image` says and what the manifest held
    location: str  # where it is read: a manifest's relative path resolved, else `image`
    prompt: str | None = None  # the manifest's per-row prompt
    # an argument that named no image (a missing file, an empty folder): the row's result
    error: str | None = None
    error_type: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_uri(location: str) -> bool:
    """An object-store (or file://) URI that pyarrow's filesystems read; http(s) is fetched as a URL."""
    return bool(_URI.match(location)) and not inputs.is_url(location)


def is_manifest(arg: str) -> bool:
    return arg.lower().endswith(MANIFEST_SUFFIXES)


def expand_inputs(args: Iterable[str]) -> list[Row]:
    """Every row of the job, in the order given; ids checked unique."""
    rows: list[Row] = []
    for arg in args:
        if arg == inputs.STDIN:
            raise UsageError("vlm batch reads no image from stdin; give files, folders, globs, URLs or a manifest")
        if is_manifest(arg):
            rows.extend(read_manifest(arg))
        elif inputs.is_url(arg):
            rows.append(Row(arg, arg, arg))
        elif is_uri(arg):
            rows.extend(_list_uri(arg))
        else:
            for entry in inputs.expand_each([arg]):
                if isinstance(entry, inputs.BadInput):
                    rows.append(Row(entry.name, entry.name, entry.name, error=str(entry.error), error_type=entry.error.kind))
                else:
                    rows.append(Row(entry.name, entry.name, entry.name))
    check_unique(rows)
    return rows


def check_unique(rows: list[Row]) -> None:
    seen: set[str] = set()
    for row in rows:
        if row.id in seen:
            raise UsageError(f"id '{row.id}' appears twice in the inputs; ids must be unique, as --resume tells rows apart by them")
        seen.add(row.id)


# --------------------------------------------------------------------------- manifests


def read_manifest(arg: str) -> list[Row]:
    base = manifest_base(arg)
    kind = manifest_kind(arg)
    if kind == "parquet":
        found: Iterable[dict] = _parquet_records(arg)
    else:
        with _open_text(arg) as f:
            lines = f.read().splitlines()
        found = (r for n, line in enumerate(lines, 1) if (r := line_record(kind, line, arg, f"line {n}")) is not None)
    return [manifest_row(record, base, arg) for record in found]


def manifest_kind(arg: str) -> str:
    """txt, jsonl or parquet."""
    return arg.lower().rsplit(".", 1)[-1]


def line_record(kind: str, line: str, manifest: str, where: str) -> dict | None:
    """A text or JSONL manifest's line -> its record ({"image", "id"?, "prompt"?}), or None
    for a blank line or a '#' comment of a text manifest."""
    if kind == "txt":
        line = line.strip()
        return {"image": line} if line and not line.startswith("#") else None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise VlmError(f"manifest '{manifest}' {where} is not JSON: {e.msg}") from None
    if not isinstance(record, dict):
        raise VlmError(f"manifest '{manifest}' {where} is not a JSON object with an 'image'")
    return record


def manifest_base(arg: str) -> str:
    """The folder a manifest's relative paths start from."""
    if is_uri(arg):
        return arg.rsplit("/", 1)[0]
    return str(Path(arg).expanduser().resolve().parent)


def manifest_row(record: dict, base: str, manifest: str) -> Row:
    """One manifest record ({"image", "id"?, "prompt"?}) -> a Row. Shared by the local run
    and the Ray one, so both give a row the same id and read it from the same place."""
    image = record.get("image")
    if not isinstance(image, str) or not image:
        raise VlmError(f"manifest '{manifest}': a row has no image (got {image!r}); every row needs a path or URL in 'image'")
    row_id = record.get("id")
    prompt = record.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise VlmError(f"manifest '{manifest}': the prompt of '{image}' is not text ({prompt!r})")
    return Row(
        id=image if row_id is None else str(row_id),
        image=image,
        location=resolve_location(image, base),
        prompt=prompt or None,
    )


def resolve_location(image: str, base: str) -> str:
    if inputs.is_url(image) or is_uri(image):
        return image
    path = os.path.expanduser(image)
    if os.path.isabs(path):
        return path
    return posixpath.join(base, image) if is_uri(base) else os.path.join(base, path)


def _parquet_records(arg: str) -> Iterator[dict]:
    pq = require_pyarrow("a Parquet manifest").parquet
    fs, path = filesystem_for(arg)
    columns = parquet_manifest_columns(arg)
    try:
        return iter(pq.read_table(path, filesystem=fs, columns=columns).to_pylist())
    except OSError as e:
        raise VlmError(f"cannot read manifest '{arg}': {e}") from None


def parquet_manifest_columns(arg: str) -> list[str]:
    """The columns of a Parquet manifest that rows are made of (image, and id / prompt where
    it has them), read from its footer."""
    pq = require_pyarrow("a Parquet manifest").parquet
    fs, path = filesystem_for(arg)
    try:
        names = pq.read_schema(path, filesystem=fs).names
    except FileNotFoundError:
        raise VlmError(f"cannot read manifest '{arg}': no such file") from None
    except OSError as e:  # not Parquet, damaged, no access
        raise VlmError(f"cannot read manifest '{arg}': {e}") from None
    if "image" not in names:
        raise VlmError(f"manifest '{arg}' has no 'image' column (its columns: {', '.join(names)})")
    return [c for c in ("image", "id", "prompt") if c in names]


def _open_text(arg: str):
    try:
        if is_uri(arg):
            fs, path = filesystem_for(arg)
            import io

            return io.TextIOWrapper(fs.open_input_stream(path), encoding="utf-8")
        return open(os.path.expanduser(arg), encoding="utf-8")
    except FileNotFoundError:
        raise VlmError(f"cannot read manifest '{arg}': no such file") from None
    except OSError as e:
        raise VlmError(f"cannot read manifest '{arg}': {e}") from None


# --------------------------------------------------------------------------- object stores


def require_pyarrow(what: str):
    try:
        import pyarrow
        import pyarrow.fs
        import pyarrow.parquet  # noqa: F401 (pyarrow.parquet is used through the package)
    except ImportError:
        raise VlmError(f"{what} needs pyarrow, which is not installed (pip install 'vlmcli[parquet]')") from None
    return pyarrow


def filesystem_for(location: str):
    """(pyarrow filesystem, path in it) for a URI (s3://, gs://, file://...) or a local path."""
    pa = require_pyarrow(f"'{location}'")
    if not is_uri(location):
        return pa.fs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))
    try:
        return pa.fs.FileSystem.from_uri(location)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise VlmError(f"cannot open '{location}': {e}") from None


def _list_uri(arg: str) -> list[Row]:
    """An object-store URI: the one file it names, or the images under it (sorted, recursive)."""
    pa = require_pyarrow(f"'{arg}'")
    fs, path = filesystem_for(arg)
    try:
        info = fs.get_file_info(path)
        if info.type == pa.fs.FileType.File:
            return [Row(arg, arg, arg)]
        if info.type == pa.fs.FileType.NotFound:
            return [Row(arg, arg, arg, error=f"cannot read image '{arg}': no such file", error_type="missing")]
        found = fs.get_file_info(pa.fs.FileSelector(path, recursive=True))
    except (pa.ArrowException, OSError) as e:
        return [Row(arg, arg, arg, error=f"cannot list '{arg}': {e}", error_type="fetch_failed")]
    prefix = arg.rstrip("/")
    names = sorted(
        f.path[len(path.rstrip("/")) + 1 :]
        for f in found
        if f.type == pa.fs.FileType.File and os.path.splitext(f.path)[1].lower() in inputs.IMAGE_SUFFIXES
    )
    if not names:
        return [Row(arg, arg, arg, error=f"'{arg}' has no images", error_type="missing")]
    return [Row(f"{prefix}/{n}", f"{prefix}/{n}", f"{prefix}/{n}") for n in names]
