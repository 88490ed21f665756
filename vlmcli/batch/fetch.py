"""A row's image, read and decoded ahead of the model.

Reading is what stalls a batch job (a network fetch, an object store, a cold disk), so a
background thread reads the next few rows while the model describes this one; a bounded
queue keeps at most `depth` images in memory, whatever the size of the collection. The
thread decodes them too (`ImageInput.decoded`, the pipeline's own decoder, so a decode error
is the same error `vlm describe` reports for that file): the model never waits for a large
JPEG to decompress.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from vlmcli import inputs
from vlmcli.batch.sources import Row, filesystem_for, is_uri
from vlmcli.errors import ImageError, VlmError

READ_AHEAD = 4  # images read before the model asks for them
T = TypeVar("T")
R = TypeVar("R")


def fetch(row: Row, *, max_bytes: int = inputs.MAX_DOWNLOAD_BYTES) -> inputs.ImageInput:
    """The row's image read and decoded, named by where it was read; an ImageError if it
    cannot be read or decoded."""
    return _read(row, max_bytes).decoded()


def _read(row: Row, max_bytes: int) -> inputs.ImageInput:
    if row.error is not None:
        raise ImageError(row.error, kind=row.error_type or "unreadable")
    where = row.location
    if inputs.is_url(where):
        return inputs.ImageInput(where, inputs.fetch_url(where, max_bytes=max_bytes))
    if is_uri(where):
        return inputs.ImageInput(where, _read_uri(where, max_bytes))
    return read_file(inputs.ImageInput(where, Path(where)))


def read_file(image: inputs.ImageInput) -> inputs.ImageInput:
    """A file's image as its bytes (other sources as they are)."""
    if not isinstance(image.source, Path):
        return image
    try:
        return inputs.ImageInput(image.name, image.source.read_bytes())
    except OSError:
        # the file's own reader words it as `vlm describe` does (no such file, a directory,
        # permission denied)
        from vlmcli.preprocess import probe_image

        probe_image(image.source, name=image.name)
        raise ImageError(f"cannot read image '{image.name}'") from None


def _read_uri(uri: str, max_bytes: int) -> bytes:
    try:
        fs, path = filesystem_for(uri)
        with fs.open_input_stream(path) as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise ImageError(f"cannot read image '{uri}': no such file", kind="missing") from None
    except VlmError as e:
        raise ImageError(str(e), kind="fetch_failed") from None
    except Exception as e:  # pyarrow's errors (ArrowIOError is an OSError; others are not)
        raise ImageError(f"cannot read image '{uri}': {e}", kind="fetch_failed") from None
    if len(data) > max_bytes:
        raise ImageError(f"cannot read image '{uri}': it is larger than {max_bytes} bytes", kind="too_large")
    return data


def read_ahead(rows: Iterable[Row], depth: int = READ_AHEAD) -> Iterator[tuple[Row, inputs.ImageInput | ImageError]]:
    """(row, its decoded image or why not) in the order of `rows`, read by a background
    thread up to `depth` rows ahead. Closing the iterator stops the thread."""
    return ahead(rows, fetch, depth)


def ahead(items: Iterable[T], read: Callable[[T], R], depth: int = READ_AHEAD) -> Iterator[tuple[T, R | ImageError]]:
    """(item, read(item) or the ImageError it raised) in order, `read` run by a background
    thread up to `depth` items ahead. Closing the iterator stops the thread."""
    done = object()
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for item in items:
                try:
                    entry = (item, read(item))
                except ImageError as e:
                    entry = (item, e)
                if not put(entry):
                    return
            put(done)
        except BaseException as e:  # a bug in reading: raised again where the items are taken
            put(e)

    thread = threading.Thread(target=reader, name="vlm-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            entry = slots.get()
            if entry is done:
                return
            if isinstance(entry, BaseException):
                raise entry
            yield entry
    finally:
        stop.set()
        thread.join(timeout=1.0)  # a daemon: a fetch still waiting on the network ends with the process
