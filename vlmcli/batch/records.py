"""One output row: an answer (the fields of `vlm describe --json`, with the row's id and any
notes) or an error (id, image, error, error_type, as describe's error records).

JSONL rows carry only their own kind's fields; Parquet rows all have every column (the
other kind's are null), so every shard and every resumed run has one schema.
"""

from __future__ import annotations

from typing import Any

from vlmcli.generate import Timings

ANSWER_FIELDS = (
    "id", "image", "model", "backend", "prompt", "text", "tokens", "prompt_tokens", "image_tokens",
    "finish_reason", "timings", "notes",
)
ERROR_FIELDS = ("id", "image", "error", "error_type")
COLUMNS = ANSWER_FIELDS + ERROR_FIELDS[2:]
TIMING_FIELDS = tuple(Timings().as_dict())


def describe_record(image: str, answer, *, model: str, backend: str, prompt: str) -> dict[str, Any]:
    """What `vlm describe --json` prints for one answer (the CLI contract's fields)."""
    return {
        "image": image,
        "model": model,
        "backend": backend,
        "prompt": prompt,
        "text": answer.text,
        "tokens": answer.tokens,
        "prompt_tokens": answer.prompt_tokens,
        "image_tokens": answer.image_tokens,
        "finish_reason": answer.finish_reason,
        "timings": answer.timings.as_dict(),
    }


def answer_record(row_id: str, image: str, answer, *, model: str, backend: str, prompt: str) -> dict[str, Any]:
    return {
        "id": row_id,
        **describe_record(image, answer, model=model, backend=backend, prompt=prompt),
        "notes": list(answer.notes),
    }


def error_record(row_id: str, image: str, message: str, error_type: str) -> dict[str, Any]:
    return {"id": row_id, "image": image, "error": message, "error_type": error_type}


def is_error(record: dict[str, Any]) -> bool:
    return record.get("error") is not None


def arrow_schema():
    import pyarrow as pa

    text = pa.string()
    return pa.schema([
        ("id", text), ("image", text), ("model", text), ("backend", text), ("prompt", text), ("text", text),
        ("tokens", pa.list_(pa.int64())), ("prompt_tokens", pa.int64()), ("image_tokens", pa.int64()),
        ("finish_reason", text), ("timings", pa.struct([(f, pa.float64()) for f in TIMING_FIELDS])),
        ("notes", pa.list_(text)), ("error", text), ("error_type", text),
    ])


def to_table(records: list[dict[str, Any]]):
    """Records -> a pyarrow Table of `arrow_schema()` (a kind's missing fields null)."""
    import pyarrow as pa

    return pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in records], schema=arrow_schema())


def from_table_row(row: dict[str, Any]) -> dict[str, Any]:
    """A Parquet row back into its record (the other kind's null columns dropped)."""
    fields = ERROR_FIELDS if row.get("error") is not None else ANSWER_FIELDS
    return {f: row.get(f) for f in fields}
