"""Where `vlm batch` writes, so that a killed run loses at most the rows in flight and never
leaves a damaged file.

    OUT.jsonl      one row a line, appended and flushed as each row is done, fsynced every
                   FSYNC_EVERY_S seconds and at the end. A kill can leave a partial last
                   line only; --resume cuts it off and appends after the rows that are whole.
    OUT.parquet    a Parquet file is written whole or not at all, so rows go to a journal
                   (OUT.parquet.journal.jsonl, as above) and are merged into OUT.parquet at the
                   end (also after Ctrl-C), through a temporary file renamed over it. --resume
                   reads the ids in both.

An existing output is refused unless --resume (continue it) or --force (start over).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from vlmcli.batch import records
from vlmcli.batch.sources import require_pyarrow
from vlmcli.errors import UsageError, VlmError

FSYNC_EVERY_S = 2.0
JOURNAL_SUFFIX = ".journal.jsonl"
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
MERGE_ROWS = 10_000  # journal rows converted to Parquet at a time (memory stays bounded)


def output_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"the output '{path}' must end in .jsonl or .parquet (it says which format to write)")
    return fmt


def open_output(path: Path, *, resume: bool, force: bool) -> "JsonlOutput | ParquetOutput":
    fmt = output_format(path)
    journal = journal_path(path)
    leftovers = [p for p in ([path, journal] if fmt == "parquet" else [path]) if p.exists()]
    if any(p.is_dir() for p in leftovers):
        raise UsageError(f"the output '{path}' is a folder (a `vlm batch --ray` output?); give a file name")
    if leftovers and not resume:
        if not force:
            what = f"an interrupted run's journal '{journal.name}' exists" if leftovers == [journal] else "exists"
            raise UsageError(f"the output '{path}' {what}; --resume to continue it, or --force to start over")
        for p in leftovers:
            p.unlink()
    if not path.parent.is_dir():
        raise UsageError(f"cannot write '{path}': folder '{path.parent}' does not exist")
    return ParquetOutput(path) if fmt == "parquet" else JsonlOutput(path)


def journal_path(path: Path) -> Path:
    return path.with_name(path.name + JOURNAL_SUFFIX)


class JsonlOutput:
    def __init__(self, path: Path):
        self.path = path
        self.done: set[str] = set()  # ids of the rows already there
        self.failed: set[str] = set()  # the ids among them of error rows
        self.notes: list[str] = []  # what was repaired, for the user
        self.written = 0  # rows this run
        self._created = not path.exists()
        if path.exists():
            for record in self._whole_rows():
                self._count(record)
        self._file = open(path, "ab")
        self._synced_at = time.monotonic()
        _sync_folder(path.parent)  # the file's name survives a crash too

    def _count(self, record: dict[str, Any]) -> None:
        self.done.add(record["id"])
        if records.is_error(record):
            self.failed.add(record["id"])

    def _whole_rows(self) -> Iterator[dict[str, Any]]:
        """The rows already written; a partial last line (a killed run's) is cut off."""
        good_end = 0
        with open(self.path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.endswith(b"\n"):
                    break
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                        raise ValueError
                except ValueError:
                    raise VlmError(
                        f"cannot resume '{self.path}': line {n} is not a row of vlm batch; "
                        "not appending to a file something else wrote"
                    ) from None
                good_end += len(line)
                yield record
        size = self.path.stat().st_size
        if size > good_end:
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                os.fsync(f.fileno())
            self.notes.append(f"{self.path}: cut off a partial last row ({size - good_end} bytes) left by an interrupted run")

    def write(self, record: dict[str, Any]) -> None:
        # one write of one whole line: a kill leaves this line out or partial, never an earlier one
        self._file.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
        self._file.flush()
        self.written += 1
        if time.monotonic() - self._synced_at >= FSYNC_EVERY_S:
            os.fsync(self._file.fileno())
            self._synced_at = time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        if self._created and not self.written:  # a run that ended before its first row leaves no file
            self.path.unlink(missing_ok=True)


class ParquetOutput:
    def __init__(self, path: Path):
        pa = require_pyarrow("a Parquet output")
        self.path = path
        self.schema = records.arrow_schema()
        self.done: set[str] = set()
        self.failed: set[str] = set()
        self._in_file: set[str] = set()  # ids in OUT.parquet (a journal row with one was merged already)
        if path.exists():
            try:
                table = pa.parquet.read_table(path, columns=["id", "error"])
            except (pa.ArrowException, OSError) as e:
                raise VlmError(f"cannot resume '{path}': {e}") from None
            self._in_file = set(table.column("id").to_pylist())
            self.done |= self._in_file
            self.failed |= {i for i, e in zip(table.column("id").to_pylist(), table.column("error").to_pylist()) if e is not None}
        self.journal = JsonlOutput(journal_path(path))
        # a journal row whose id is in the file was merged already (a run killed between the
        # merge's rename and the journal's removal); the merge skips it
        self.done |= self.journal.done
        self.failed |= self.journal.failed - self._in_file
        self.notes = self.journal.notes

    def write(self, record: dict[str, Any]) -> None:
        self.journal.write(record)

    def close(self) -> None:
        """Merge the journal into OUT.parquet (rows already there first) and remove it."""
        self.journal.close()
        if not self.journal.path.exists() or self.journal.path.stat().st_size == 0:  # nothing new
            self.journal.path.unlink(missing_ok=True)
            return
        pq = require_pyarrow("a Parquet output").parquet
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        try:
            with pq.ParquetWriter(tmp, self.schema) as writer:
                if self.path.exists():
                    for batch in pq.ParquetFile(self.path).iter_batches(batch_size=MERGE_ROWS):
                        writer.write_batch(batch)
                chunk: list[dict[str, Any]] = []
                for record in self._journal_rows():
                    if record["id"] in self._in_file:
                        continue
                    chunk.append(record)
                    if len(chunk) == MERGE_ROWS:
                        writer.write_table(records.to_table(chunk))
                        chunk = []
                if chunk:
                    writer.write_table(records.to_table(chunk))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _sync_folder(self.path.parent)
        self.journal.path.unlink()

    def _journal_rows(self) -> Iterator[dict[str, Any]]:
        with open(self.journal.path, "rb") as f:
            for line in f:
                yield json.loads(line)


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every filesystem lets a folder be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
