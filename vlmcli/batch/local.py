"""The batch job on this machine: the rows not yet in the output, in input order, each
written as soon as it is described."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vlmcli.batch import records
from vlmcli.batch.describer import Describer
from vlmcli.batch.fetch import read_ahead
from vlmcli.batch.output import JsonlOutput, ParquetOutput
from vlmcli.batch.sources import Row


@dataclass
class Summary:
    rows: int  # rows of this job in the output now
    skipped: int  # of them already there before this run (--resume)
    failed: int  # error rows among `rows`


def run_local(
    rows: list[Row],
    output: JsonlOutput | ParquetOutput,
    describer: Callable[[], Describer],
    progress: Callable[[int, int], None] | None = None,
) -> Summary:
    """Describe `rows` into `output` (closed at the end, whatever happens). `describer` is
    called for the model only when a row needs one: a job whose rows are all done, or all
    bad arguments, loads nothing."""
    todo = [row for row in rows if row.id not in output.done]
    skipped = len(rows) - len(todo)
    failed = sum(1 for row in rows if row.id in output.failed)
    model: Describer | None = None
    try:
        for done, (row, image) in enumerate(read_ahead(todo), 1):
            if row.error is not None:  # an argument that named no image: no model needed
                record = Describer.failure(row, image)
            else:
                model = model or describer()
                record = model.describe_fetched(row, image)
            output.write(record)
            failed += records.is_error(record)
            if progress:
                progress(done, len(todo))
    finally:
        output.close()
    return Summary(rows=len(rows), skipped=skipped, failed=failed)
