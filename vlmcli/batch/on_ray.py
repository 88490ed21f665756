"""The batch job on Ray Data, for collections that outgrow one machine.

    read         manifests with ray.data.read_text / read_parquet (local paths, or s3://,
                 gs://... through pyarrow's filesystems), files listed on the command line
                 with from_items; each row normalised as the local run does (sources.py)
    map_batches  an actor pool (ActorPoolStrategy(size=actors)), each actor loading the model
                 once and describing `rows_per_call` rows a call with the local run's
                 Describer: a row that fails is an error record, not a failed task
    write        Parquet or JSONL shards into the output folder

Without an address (--ray-address or RAY_ADDRESS, which `ray job submit` sets) a local Ray
is started on this machine and stopped at the end.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from vlmcli.batch import records, sources
from vlmcli.batch.describer import Describer, JobSettings
from vlmcli.batch.fetch import read_ahead
from vlmcli.batch.sources import Row
from vlmcli.errors import UsageError, VlmError

ROW_COLUMNS = tuple(Row.__dataclass_fields__)
# Reading a manifest, normalising its lines and writing shards are light next to describing;
# they take no CPU of Ray's budget, else the actor pool (which holds every CPU of a small
# machine) and the read that feeds it wait on each other forever.
LIGHT_TASK = {"num_cpus": 0}


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: RAY_ADDRESS, else a new local Ray
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    rows_per_call: int = 16  # rows an actor describes per call (a Ray Data batch)
    quiet: bool = False


@dataclass
class RaySummary:
    output: str
    rows: int
    failed: int


def import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise VlmError("--ray needs Ray Data, which is not installed (pip install 'vlmcli[ray]')") from None
    return ray


class RayDescriber:
    """Ray Data's class-based UDF: built once per actor (the model loads once), called with a
    batch of rows as a pyarrow Table, returning their records as one."""

    def __init__(self, settings: JobSettings, cpus: float):
        import torch

        # as many threads as the CPUs Ray gave this actor, so actors on one node do not fight
        torch.set_num_threads(max(1, int(cpus)))
        self.describer = Describer(settings)

    def __call__(self, batch):
        rows = [Row(**{c: r.get(c) for c in ROW_COLUMNS}) for r in batch.to_pylist()]
        return records.to_table([self.describer.describe_fetched(row, image) for row, image in read_ahead(rows)])


def normalize_manifest(batch, *, kind: str, base: str, manifest: str):
    """A batch of a manifest's lines (text, JSONL) or rows (Parquet) -> Row columns, as
    `sources.read_manifest` makes them on one machine."""
    import pyarrow as pa

    if kind == "parquet":
        found = batch.to_pylist()
    else:
        found = [r for line in batch.column("text").to_pylist() if (r := sources.line_record(kind, line, manifest, "a line")) is not None]
    rows = [sources.manifest_row(r, base, manifest).as_dict() for r in found]
    return pa.Table.from_pylist(rows, schema=_row_schema())


def _row_schema():
    import pyarrow as pa

    return pa.schema([(c, pa.string()) for c in ROW_COLUMNS])


def run_on_ray(args: list[str], out: str, settings: JobSettings, options: RayOptions, force: bool) -> RaySummary:
    ray = import_ray()
    fmt = _output_format(out)
    _check_output(out, force)
    started_here = False
    if not ray.is_initialized():
        address = options.address or os.environ.get("RAY_ADDRESS") or "local"
        init: dict[str, Any] = {"address": address, "log_to_driver": not options.quiet}
        if address == "local":
            init["include_dashboard"] = False
        if options.quiet:
            init["logging_level"] = logging.WARNING
        ray.init(**init)
        started_here = address == "local"
    try:
        context = ray.data.DataContext.get_current()
        if options.quiet:
            context.enable_progress_bars = False
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        results = _rows(ray, args).map_batches(
            RayDescriber,
            fn_constructor_args=(settings, options.cpus_per_actor),
            compute=ray.data.ActorPoolStrategy(size=options.actors),
            num_cpus=options.cpus_per_actor,
            num_gpus=options.gpus_per_actor or None,
            batch_size=options.rows_per_call,
            batch_format="pyarrow",
        )
        try:
            if fmt == "parquet":
                results.write_parquet(out, ray_remote_args=LIGHT_TASK)
            else:
                results.write_json(out, ray_remote_args=LIGHT_TASK)
        except Exception as e:  # a row's error is a record; this is the job's (a bad manifest, a lost node)
            raise _user_error(e) from None
        return _summary(out, fmt)
    finally:
        if started_here:
            ray.shutdown()


def _rows(ray, args: list[str]):
    """The job's rows as one Dataset: manifests read by Ray, the other inputs listed here."""
    listed = [arg for arg in args if not sources.is_manifest(arg)]
    parts = []
    if listed:
        rows = sources.expand_inputs(listed)
        parts.append(ray.data.from_arrow(_arrow_rows(rows)))
    for manifest in (a for a in args if sources.is_manifest(a)):
        kind = sources.manifest_kind(manifest)
        path = manifest if sources.is_uri(manifest) else os.path.abspath(os.path.expanduser(manifest))
        if kind == "parquet":
            ds = ray.data.read_parquet(path, columns=sources.parquet_manifest_columns(manifest), **LIGHT_TASK)
        else:
            if not sources.is_uri(manifest) and not os.path.isfile(path):
                raise VlmError(f"cannot read manifest '{manifest}': no such file")
            ds = ray.data.read_text(path, **LIGHT_TASK)
        parts.append(ds.map_batches(
            normalize_manifest,
            fn_kwargs={"kind": kind, "base": sources.manifest_base(manifest), "manifest": manifest},
            batch_format="pyarrow",
            **LIGHT_TASK,
        ))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _arrow_rows(rows: list[Row]):
    import pyarrow as pa

    return pa.Table.from_pylist([r.as_dict() for r in rows], schema=_row_schema())


def _output_format(out: str) -> str:
    lowered = out.rstrip("/").lower()
    for suffix, fmt in ((".parquet", "parquet"), (".jsonl", "jsonl")):
        if lowered.endswith(suffix):
            return fmt
    raise UsageError(f"the output '{out}' must end in .jsonl or .parquet (with --ray, a folder of that name gets the shards)")


def _check_output(out: str, force: bool) -> None:
    pa = sources.require_pyarrow("--ray")
    fs, path = sources.filesystem_for(out)
    info = fs.get_file_info(path)
    if info.type == pa.fs.FileType.NotFound:
        return
    if not force:
        raise UsageError(f"the output '{out}' exists; --force to replace it (--resume is not supported with --ray)")
    if info.type == pa.fs.FileType.Directory:
        fs.delete_dir(path)
    else:
        fs.delete_file(path)


def _summary(out: str, fmt: str) -> RaySummary:
    sources.require_pyarrow("--ray")  # a one-line error, not an ImportError
    import pyarrow.dataset as ds

    fs, path = sources.filesystem_for(out)
    table = ds.dataset(path, filesystem=fs, format="parquet" if fmt == "parquet" else "json").to_table(columns=["error"])
    return RaySummary(output=out, rows=table.num_rows, failed=table.num_rows - table.column("error").null_count)


def _user_error(e: BaseException) -> BaseException:
    """The VlmError inside Ray's wrappers (a malformed manifest line, read in a Ray task), else `e`."""
    seen = e
    while seen is not None:
        if isinstance(seen, VlmError):
            return VlmError(str(seen))
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else seen.__cause__
    return e
