"""What the commands accept as an image, turned into a list of `ImageInput`s.

    photo.jpg          a file
    'shots/*.png'      a glob, expanded here too (for shells that pass it through unexpanded)
    shots/             a folder: its images, sorted by name
    -                  image bytes on stdin
    https://...        fetched over http(s), with a size limit and a timeout

Everything is checked (and every URL fetched) before a model is loaded, so a typo fails in
a second rather than after the load.
"""

from __future__ import annotations

import glob
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterable

from vlmcli import __version__
from vlmcli.errors import ImageError, UsageError

if TYPE_CHECKING:  # preprocess imports Pillow, which `vlm --help` does not need
    from vlmcli.preprocess import LoadedImage

# What a folder's "images" are: the formats people keep pictures in that Pillow decodes.
IMAGE_SUFFIXES = frozenset(
    ".png .jpg .jpeg .jpe .jfif .gif .bmp .webp .tif .tiff .ppm .pgm .pbm .pnm .tga .ico .avif .apng .qoi".split()
)
MAX_DOWNLOAD_BYTES = 50 * 1024 * 1024
DOWNLOAD_TIMEOUT_S = 30.0
STDIN = "-"


@dataclass(frozen=True)
class ImageInput:
    """One image: `name` is how the user wrote it (a path, a URL, or "-" for stdin) and is
    what output and error messages call it; `source` is a file, bytes, or a URL not yet
    fetched (a str), or the image already decoded (a LoadedImage: decoded ahead of the model
    by a reading thread)."""

    name: str
    source: Path | bytes | str | LoadedImage

    @property
    def is_url(self) -> bool:
        return isinstance(self.source, str)

    def decoded(self) -> "ImageInput":
        """This image decoded (fetched first if it is a URL): the work a thread can do ahead
        of the model. Its errors are those the pipeline would raise for it."""
        from vlmcli.preprocess import LoadedImage, load_image_with_notes

        if isinstance(self.source, LoadedImage):
            return self
        return ImageInput(self.name, load_image_with_notes(self.fetched().source, name=self.name))

    def fetched(self, *, max_bytes: int = MAX_DOWNLOAD_BYTES, timeout: float = DOWNLOAD_TIMEOUT_S) -> "ImageInput":
        """This image with a URL replaced by the downloaded bytes."""
        if not self.is_url:
            return self
        return ImageInput(self.name, fetch_url(self.source, max_bytes=max_bytes, timeout=timeout))

    def label(self) -> str:
        """The name to keep in a saved transcript: absolute for files, so it still works elsewhere."""
        if isinstance(self.source, Path):
            return os.path.abspath(self.source)
        return self.name


def is_url(arg: str) -> bool:
    return arg[:8].lower().startswith(("http://", "https://"))


def expand(args: Iterable[str], *, stdin: BinaryIO | None = None, allow_stdin: bool = True) -> list[ImageInput]:
    """Command-line image arguments -> images, in the order given (folders and globs sorted)."""
    out: list[ImageInput] = []
    used_stdin = False
    for arg in args:
        if arg == STDIN:
            if not allow_stdin:
                raise UsageError("'-' (an image on stdin) cannot be used here")
            if used_stdin:
                raise UsageError("'-' (an image on stdin) can be given only once")
            used_stdin = True
            out.append(ImageInput(STDIN, read_stdin(stdin)))
        elif is_url(arg):
            out.append(ImageInput(arg, arg))
        else:
            out.extend(_expand_path(arg))
    return out


@dataclass(frozen=True)
class BadInput:
    """An argument that gave no image, and why: what `expand_each` keeps in place of it."""

    name: str
    error: ImageError


def expand_each(args: Iterable[str], *, stdin: BinaryIO | None = None) -> list[ImageInput | BadInput]:
    """As `expand`, but an argument that names no image (a missing file, an empty folder, a
    glob matching nothing, nothing on stdin) becomes a BadInput in its place and the others
    go on. A UsageError (stdin twice, or stdin a terminal) still ends it."""
    args = list(args)
    if args.count(STDIN) > 1:
        raise UsageError("'-' (an image on stdin) can be given only once")
    out: list[ImageInput | BadInput] = []
    for arg in args:
        try:
            out.extend(expand([arg], stdin=stdin))
        except ImageError as e:
            out.append(BadInput(arg, e))
    return out


def _expand_path(arg: str) -> list[ImageInput]:
    path = Path(arg).expanduser()
    if path.is_file():
        return [ImageInput(arg, path)]
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise ImageError(f"folder '{arg}' has no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})", kind="missing")
        return [ImageInput(str(p), p) for p in images]
    if glob.has_magic(arg):
        matches = sorted(glob.glob(os.path.expanduser(arg), recursive=True))
        if not matches:
            raise ImageError(f"no files match '{arg}'", kind="missing")
        # as if the shell had expanded it: each match is a file or a folder argument
        return [image for match in matches for image in _expand_path(match)]
    raise ImageError(f"cannot read image '{arg}': no such file", kind="missing")


def read_stdin(stdin: BinaryIO | None = None, *, max_bytes: int = MAX_DOWNLOAD_BYTES) -> bytes:
    stream = stdin if stdin is not None else sys.stdin.buffer
    if stream.isatty():
        raise UsageError("'-' reads an image from stdin, but stdin is a terminal (pipe a file in: vlm describe - < photo.jpg)")
    data = stream.read(max_bytes + 1)
    if not data:
        raise ImageError("no image on stdin: it is empty", kind="missing")
    if len(data) > max_bytes:
        raise ImageError(f"the image on stdin is larger than {_mib(max_bytes)}", kind="too_large")
    return data


def fetch_url(url: str, *, max_bytes: int = MAX_DOWNLOAD_BYTES, timeout: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    """GET an http(s) URL: at most `max_bytes`, and at most `timeout` seconds in all (not
    just per read, so a server that trickles bytes cannot hold us forever)."""
    request = urllib.request.Request(url, headers={"User-Agent": f"vlm/{__version__}"})
    deadline = time.monotonic() + timeout
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise ImageError(f"cannot fetch '{url}': it is {_mib(int(length))}, more than the limit of {_mib(max_bytes)}", kind="too_large")
            chunks: list[bytes] = []
            size = 0
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunk = response.read(min(1 << 16, max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise ImageError(f"cannot fetch '{url}': it is more than the limit of {_mib(max_bytes)}", kind="too_large")
    except urllib.error.HTTPError as e:
        raise ImageError(f"cannot fetch '{url}': HTTP {e.code} {e.reason}", kind="fetch_failed") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise ImageError(f"cannot fetch '{url}': no answer within {timeout:g} s", kind="fetch_failed") from None
        raise ImageError(f"cannot fetch '{url}': {e.reason}", kind="fetch_failed") from None
    except TimeoutError:
        raise ImageError(f"cannot fetch '{url}': no answer within {timeout:g} s", kind="fetch_failed") from None
    except (OSError, ValueError) as e:  # connection reset, malformed URL or response
        raise ImageError(f"cannot fetch '{url}': {e}", kind="fetch_failed") from None
    if not chunks:
        raise ImageError(f"cannot fetch '{url}': the server sent no data", kind="fetch_failed")
    return b"".join(chunks)


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB" if n >= 1024 * 1024 else f"{n} bytes"
