"""`vlm describe` over a collection and `vlm batch` to JSONL and Parquet: 195 answers equal to
single-image runs of the same images, 5 error rows, exit 1; a run killed with SIGKILL half
way and resumed gives exactly the rows of an uninterrupted run, each once. On the bundled
demo model (see tests/test_batch_fixtures.py for the collection)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.test_batch_fixtures import (
    BAD, GOOD, PROMPT, comparable, make_collection, png_header_only, read_jsonl, reference, without_timings,
)
from vlmcli.batch.fetch import read_ahead
from vlmcli.batch.sources import Row
from vlmcli.cli import main
from vlmcli.errors import ImageError
from vlmcli.generate import SamplingOptions
from vlmcli.pipeline import Pipeline
from vlmcli.preprocess import load_image_with_notes

TOTAL = GOOD + len(BAD)
FAILED = f"error: 5 of {TOTAL} images failed"
VLM = [sys.executable, "-m", "vlmcli"]


def run(capsys, *args):
    code = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def demo():
    return Pipeline.load("demo", "cpu")


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return make_collection(tmp_path_factory.mktemp("collection"))


@pytest.fixture(scope="module")
def expected(demo, collection):
    """Each listed path's single-image result, in manifest order."""
    return [reference(demo, p) for p in collection[1]]


@pytest.fixture(scope="module")
def uninterrupted(collection, tmp_path_factory):
    """An uninterrupted `vlm batch` of the manifest to JSONL."""
    out = tmp_path_factory.mktemp("whole") / "out.jsonl"
    assert main(["batch", str(collection[0]), "-o", str(out), "-m", "demo", "-q"]) == 1
    return read_jsonl(out)


def test_the_collection_is_what_it_says(expected):
    errors = [e for e in expected if "error" in e]
    assert [e["error_type"] for e in errors] == ["undecodable", "undecodable", "undecodable", "too_large", "missing"]
    assert len({e["text"] for e in expected if "text" in e}) > 10  # the demo model tells them apart


def test_describe_goes_past_bad_files(capsys, collection, expected):
    manifest, paths = collection
    folder = Path(paths[0]).parent
    gone = str(folder / "gone.png")
    code, out, err = run(capsys, "describe", folder, gone, "-m", "demo", "--json", "-q")
    assert (code, err) == (1, FAILED + "\n")
    records = {r["image"]: r for r in map(json.loads, out.splitlines())}
    assert sorted(records) == sorted(paths)
    for path, want in zip(paths, expected):
        assert comparable(records[path]) == want, path


def test_batch_to_jsonl_equals_single_image_runs(collection, expected, uninterrupted):
    manifest, paths = collection
    assert [r["id"] for r in uninterrupted] == paths  # input order, the path as written for the id
    assert [r["image"] for r in uninterrupted] == paths
    assert [comparable(r) for r in uninterrupted] == expected
    good = next(r for r in uninterrupted if "text" in r)
    assert sorted(good) == sorted([
        "id", "image", "model", "backend", "prompt", "text", "tokens", "prompt_tokens", "image_tokens",
        "finish_reason", "timings", "notes",
    ])
    assert (good["model"], good["backend"], good["prompt"], good["notes"]) == ("demo", "cpu", PROMPT, [])
    bad = [r for r in uninterrupted if "error" in r]
    assert [sorted(r) for r in bad] == [["error", "error_type", "id", "image"]] * 5


def test_single_image_cli_runs_agree(capsys, collection, uninterrupted):
    for row in uninterrupted[:3]:
        code, out, _ = run(capsys, "describe", row["image"], "-m", "demo", "--json", "-q")
        assert code == 0
        assert without_timings(json.loads(out)) == without_timings({k: v for k, v in row.items() if k not in ("id", "notes")})


def _kill_half_way(args: list, progress: Path) -> None:
    """Start `vlm batch`, SIGKILL it once `progress` (its output or journal) has ~half the rows."""
    child = subprocess.Popen([*VLM, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            if progress.exists() and progress.read_bytes().count(b"\n") >= TOTAL // 2:
                break
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    lines = progress.read_bytes().count(b"\n")
    assert child.returncode == -signal.SIGKILL and TOTAL // 4 < lines < TOTAL, lines


@pytest.mark.slow
def test_killed_jsonl_run_resumes_to_the_same_rows(collection, uninterrupted, tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["batch", collection[0], "-o", out, "-m", "demo", "-q"]
    _kill_half_way(args, out)
    with open(out, "ab") as f:  # as if the kill had cut the row being written
        f.write(b'{"id": "half a ro')
    again = subprocess.run([*VLM, *map(str, args[:-1]), "--resume"], capture_output=True, text=True)
    assert again.returncode == 1
    assert again.stderr.endswith(f"{FAILED} (their rows in {out} say why)\n")
    assert "cut off a partial last row (17 bytes) left by an interrupted run" in again.stderr
    assert [without_timings(r) for r in read_jsonl(out)] == [without_timings(r) for r in uninterrupted]


@pytest.mark.slow
def test_batch_to_parquet_killed_and_resumed_has_the_rows_of_an_uninterrupted_run(collection, uninterrupted, tmp_path):
    out = tmp_path / "out.parquet"
    args = ["batch", collection[0], "-o", out, "-m", "demo", "-q"]
    _kill_half_way(args, tmp_path / "out.parquet.journal.jsonl")
    assert not out.exists()  # nothing half-written: the rows so far are in the journal
    refused = subprocess.run([*VLM, *map(str, args)], capture_output=True, text=True)
    assert (refused.returncode, refused.stderr) == (2, (
        f"error: the output '{out}' an interrupted run's journal 'out.parquet.journal.jsonl' exists; "
        "--resume to continue it, or --force to start over\n"
    ))
    again = subprocess.run([*VLM, *map(str, args), "--resume"], capture_output=True, text=True)
    assert (again.returncode, again.stderr) == (1, f"{FAILED} (their rows in {out} say why)\n")
    assert sorted(os.listdir(tmp_path)) == ["out.parquet"]  # the journal merged and gone
    table = pq.read_table(out)
    assert table.column_names == [
        "id", "image", "model", "backend", "prompt", "text", "tokens", "prompt_tokens", "image_tokens",
        "finish_reason", "timings", "notes", "error", "error_type",
    ]
    # a JSONL row's fields, and nulls for the other kind's
    rows = [{k: v for k, v in r.items() if v is not None} for r in table.to_pylist()]
    assert [without_timings(r) for r in rows] == [without_timings(r) for r in uninterrupted]


def test_resume_of_a_finished_job_loads_no_model(capsys, collection, uninterrupted, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in uninterrupted))
    code, stdout, err = run(capsys, "batch", collection[0], "-o", out, "-m", tmp_path / "no-model", "--resume")
    assert (code, stdout) == (1, "")
    assert err == f"{out}: {TOTAL} rows, {TOTAL} of them from before\n{FAILED} (their rows in {out} say why)\n"
    assert read_jsonl(out) == uninterrupted


def test_an_existing_output_is_refused_unless_resume_or_force(capsys, demo, collection, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    code, _, err = run(capsys, "batch", collection[1][0], "-o", out, "-m", "demo")
    assert (code, err) == (2, f"error: the output '{out}' exists; --resume to continue it, or --force to start over\n")
    assert out.read_text() == "keep me\n"
    code, _, err = run(capsys, "batch", collection[1][0], "-o", out, "-m", "demo", "--resume")
    assert (code, err) == (1, f"error: cannot resume '{out}': line 1 is not a row of vlm batch; not appending to a file something else wrote\n")
    code, _, err = run(capsys, "batch", collection[1][0], "-o", out, "-m", "demo", "--force", "-q")
    assert (code, err) == (0, "")
    assert [comparable(r) for r in read_jsonl(out)] == [reference(demo, collection[1][0])]


def test_a_run_that_fails_to_start_leaves_no_output(capsys, collection, tmp_path):
    for name in ("out.jsonl", "out.parquet"):
        out = tmp_path / name
        code, stdout, err = run(capsys, "batch", collection[1][0], "-o", out, "-m", tmp_path / "no-model")
        assert (code, stdout, err.count("\n")) == (2, "", 1) and err.startswith("error: ")  # no such model: usage
        assert os.listdir(tmp_path) == []


def test_manifests_with_ids_and_prompts(capsys, demo, collection, tmp_path):
    paths = collection[1]
    folder = Path(paths[0]).parent
    # relative paths are relative to the manifest's folder
    rows = [
        {"id": 7, "image": "img000.png"},
        {"id": "b", "image": "img001.png", "prompt": "What colour is it?"},
        {"id": "c", "image": "gone.png"},
    ]
    jsonl = folder / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(
        [{"id": str(r["id"]), "image": str(folder / r["image"]), "prompt": r.get("prompt")} for r in rows]
    ), parquet)
    for manifest in (jsonl, parquet):
        out = tmp_path / f"out-{manifest.suffix[1:]}.jsonl"
        code, _, err = run(capsys, "batch", manifest, "-o", out, "-m", "demo", "-q")
        assert (code, err) == (1, f"error: 1 of 3 images failed (their rows in {out} say why)\n")
        got = read_jsonl(out)
        assert [r["id"] for r in got] == ["7", "b", "c"]
        assert got[0]["prompt"] == PROMPT and got[1]["prompt"] == "What colour is it?"
        assert comparable(got[0]) == reference(demo, paths[0])
        answer = demo.describe([str(folder / "img001.png")], "What colour is it?", SamplingOptions())
        assert got[1]["text"] == answer.text
        assert comparable(got[2]) == {"error": f"cannot read image '{folder / 'gone.png'}': no such file", "error_type": "missing"}


def test_object_store_uris_go_through_pyarrow(capsys, demo, collection, tmp_path):
    """file:// is read by pyarrow's filesystems as s3:// and gs:// are: a prefix lists its images."""
    folder = tmp_path / "bucket"
    folder.mkdir()
    first = Path(collection[1][0])
    (folder / "a.png").write_bytes(first.read_bytes())
    (folder / "sub").mkdir()
    (folder / "sub" / "b.png").write_bytes(b"")
    out = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "batch", f"file://{folder}/", f"file://{folder}/nothing.png", "-o", out, "-m", "demo", "-q")
    assert (code, err) == (1, f"error: 2 of 3 images failed (their rows in {out} say why)\n")
    got = read_jsonl(out)
    assert [r["id"] for r in got] == [f"file://{folder}/a.png", f"file://{folder}/sub/b.png", f"file://{folder}/nothing.png"]
    assert comparable(got[0]) == reference(demo, str(first))
    assert comparable(got[1]) == {
        "error": f"cannot read image 'file://{folder}/sub/b.png': not an image, or a format Pillow cannot decode",
        "error_type": "undecodable",
    }
    assert got[2]["error_type"] == "missing"


@pytest.mark.parametrize(
    "args, message",
    [
        (["a.png", "a.png"], "error: id 'a.png' appears twice in the inputs; ids must be unique, as --resume tells rows apart by them"),
        (["a.png", "-o", "out.csv"], "error: the output 'out.csv' must end in .jsonl or .parquet (it says which format to write)"),
        (["-"], "error: vlm batch reads no image from stdin; give files, folders, globs, URLs or a manifest"),
        (["a.png", "--actors", "2"], "error: --actors, --cpus-per-actor, --gpus-per-actor and --rows-per-call apply to --ray runs"),
        (["a.png", "--resume", "--force"], "error: --resume continues OUT and --force replaces it; give one"),
        (["a.png", "--ray", "--resume"], "error: --resume is not supported with --ray yet: the shards of a killed Ray run are not checked"),
    ],
)
def test_usage_errors(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.png").write_bytes(png_header_only(8, 8))
    if "-o" not in args:
        args = [*args, "-o", "out.jsonl"]
    code, out, err = run(capsys, "batch", *args, "-m", "demo")
    assert (code, out, err) == (2, "", message + "\n")
    assert not (tmp_path / "out.jsonl").exists()


def test_without_pyarrow_parquet_is_a_one_line_error(capsys, monkeypatch, collection, tmp_path):
    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.setitem(sys.modules, name, None)
    code, _, err = run(capsys, "batch", collection[1][0], "-o", tmp_path / "out.parquet", "-m", "demo")
    assert (code, err) == (1, "error: a Parquet output needs pyarrow, which is not installed (pip install 'vlmcli[parquet]')\n")
    code, _, err = run(capsys, "batch", collection[1][0], "-o", tmp_path / "out.jsonl", "-m", "demo", "-q")
    assert (code, err) == (0, "")  # JSONL needs none


def test_without_ray_the_ray_run_is_a_one_line_error(capsys, monkeypatch, collection, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    code, _, err = run(capsys, "batch", collection[1][0], "-o", tmp_path / "out.parquet", "-m", "demo", "--ray")
    assert (code, err) == (1, "error: --ray needs Ray Data, which is not installed (pip install 'vlmcli[ray]')\n")


def test_read_ahead_keeps_order_and_gives_errors_in_place(collection):
    paths = collection[1][:25]
    rows = [Row(p, p, p) for p in paths]
    got = list(read_ahead(rows, depth=3))
    assert [row.id for row, _ in got] == paths
    for (row, image), path in zip(got, paths):
        if path.endswith("img000.png"):  # decoded by the reading thread, as the pipeline decodes it
            assert image.source == load_image_with_notes(path, name=path) and image.name == path
        if path.endswith("cut.png"):  # its error in its place, the pipeline's words for it
            with pytest.raises(ImageError) as direct:
                load_image_with_notes(path, name=path)
            assert isinstance(image, ImageError) and str(image) == str(direct.value)
    gone = Row("x", "x", str(Path(paths[0]).parent / "gone.png"))
    [(_, error)] = list(read_ahead([gone]))
    assert isinstance(error, ImageError) and error.kind == "missing"
    # a consumer that stops early stops the reader
    stream = read_ahead(rows, depth=2)
    next(stream)
    stream.close()


def _ray_processes() -> set[int]:
    """Ids of Ray's processes (its head, raylet, workers and actors) now running."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"ray::" in cmdline or b"raylet" in cmdline or b"gcs_server" in cmdline or b"ray/_private" in cmdline:
            found.add(int(pid))
    return found


@pytest.mark.slow
def test_on_a_local_ray_two_actors_give_the_local_rows(collection, uninterrupted, tmp_path):
    before = _ray_processes()
    out = tmp_path / "out.parquet"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [*VLM, "batch", "--ray", collection[0], "-o", out, "-m", "demo", "--actors", "2", "-q"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.endswith(f"{FAILED} (their rows in {out} say why)\n")
    rows = [{k: v for k, v in r.items() if v is not None} for r in pq.read_table(out).to_pylist()]
    by_id = lambda r: r["id"]  # noqa: E731 (shards come in any order)
    assert sorted(map(without_timings, rows), key=by_id) == sorted(map(without_timings, uninterrupted), key=by_id)
    # the local Ray it started is gone
    deadline = time.monotonic() + 30
    while _ray_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes() - before
