"""Image arguments: files, globs, folders, stdin and URLs (against a local HTTP server)."""

from __future__ import annotations

import io
import time

import pytest

from vlmcli.errors import ImageError, UsageError
from vlmcli.inputs import ImageInput, expand, fetch_url


@pytest.fixture
def pictures(tmp_path, test_image):
    data = test_image.read_bytes()
    folder = tmp_path / "pics"
    folder.mkdir()
    for name in ["b.png", "a.PNG", "c.jpg", "notes.txt"]:
        (folder / name).write_bytes(data)
    (folder / "sub").mkdir()
    (folder / "sub" / "d.png").write_bytes(data)
    return folder


def names(items):
    return [item.name for item in items]


def test_files_keep_their_order_and_names(pictures):
    items = expand([str(pictures / "c.jpg"), str(pictures / "b.png")])
    assert names(items) == [str(pictures / "c.jpg"), str(pictures / "b.png")]
    assert items[0].source == pictures / "c.jpg" and not items[0].is_url


def test_folder_gives_its_images_sorted(pictures):
    # not notes.txt, not the subfolder
    assert names(expand([str(pictures)])) == [str(pictures / n) for n in ["a.PNG", "b.png", "c.jpg"]]


def test_globs_are_expanded_like_a_shell(pictures):
    assert names(expand([str(pictures / "*.png")])) == [str(pictures / "b.png")]
    assert names(expand([str(pictures / "**" / "*.png")])) == [str(pictures / "b.png"), str(pictures / "sub" / "d.png")]
    # a glob that matches a folder expands to the folder's images
    assert names(expand([str(pictures / "s*")])) == [str(pictures / "sub" / "d.png")]


def test_a_file_whose_name_looks_like_a_glob(tmp_path, test_image):
    odd = tmp_path / "shot[1].png"
    odd.write_bytes(test_image.read_bytes())
    assert names(expand([str(odd)])) == [str(odd)]


@pytest.mark.parametrize(
    "arg, error, message",
    [
        ("missing.png", ImageError, "cannot read image '{d}/missing.png': no such file"),
        ("*.gif", ImageError, "no files match '{d}/*.gif'"),
        ("empty", ImageError, "folder '{d}/empty' has no images (looked for .apng, .avif, .bmp"),
    ],
)
def test_bad_arguments_are_named(tmp_path, arg, error, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(error) as e:
        expand([f"{tmp_path}/{arg}"])
    assert str(e.value).startswith(message.format(d=tmp_path))


class _Stdin(io.BytesIO):
    def __init__(self, data=b"", tty=False):
        super().__init__(data)
        self._tty = tty

    def isatty(self):
        return self._tty


def test_stdin(test_image):
    data = test_image.read_bytes()
    assert expand(["-"], stdin=_Stdin(data)) == [ImageInput("-", data)]
    with pytest.raises(UsageError, match="can be given only once"):
        expand(["-", "-"], stdin=_Stdin(data))
    with pytest.raises(ImageError, match="no image on stdin: it is empty"):
        expand(["-"], stdin=_Stdin(b""))
    with pytest.raises(UsageError, match="stdin is a terminal"):
        expand(["-"], stdin=_Stdin(tty=True))
    with pytest.raises(UsageError, match="cannot be used here"):
        expand(["-"], stdin=_Stdin(data), allow_stdin=False)


def test_urls_are_kept_until_fetched():
    items = expand(["https://example.com/a.png", "HTTP://example.com/b"])
    assert [i.source for i in items] == ["https://example.com/a.png", "HTTP://example.com/b"]
    assert all(i.is_url for i in items)


def _send(body: bytes, length: bool = True):
    def handler(h):
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        if length:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return handler


def _slow(h):
    h.send_response(200)
    h.send_header("Content-Length", "1000")
    h.end_headers()
    for _ in range(50):  # trickles: each read is quick, the whole is not
        h.wfile.write(b"x")
        h.wfile.flush()
        time.sleep(0.05)


def test_fetch(http_server, test_image):
    base, routes = http_server
    data = test_image.read_bytes()
    routes["/ok.png"] = _send(data)
    routes["/nolength.png"] = _send(data, length=False)
    routes["/big.png"] = _send(b"x" * 5000)
    routes["/big-nolength.png"] = _send(b"x" * 5000, length=False)
    routes["/slow.png"] = _slow
    routes["/empty.png"] = _send(b"")

    assert fetch_url(f"{base}/ok.png") == data
    assert fetch_url(f"{base}/nolength.png") == data
    assert ImageInput("u", f"{base}/ok.png").fetched() == ImageInput("u", data)

    with pytest.raises(ImageError, match=r"cannot fetch '.*/missing.png': HTTP 404 Not Found"):
        fetch_url(f"{base}/missing.png")
    with pytest.raises(ImageError, match=r"it is 5000 bytes, more than the limit of 4000 bytes"):
        fetch_url(f"{base}/big.png", max_bytes=4000)
    with pytest.raises(ImageError, match=r"it is more than the limit of 4000 bytes"):
        fetch_url(f"{base}/big-nolength.png", max_bytes=4000)
    with pytest.raises(ImageError, match=r"no answer within 0.5 s"):
        fetch_url(f"{base}/slow.png", timeout=0.5)
    with pytest.raises(ImageError, match="the server sent no data"):
        fetch_url(f"{base}/empty.png")


def test_fetch_connection_refused():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ImageError, match=rf"cannot fetch 'http://127.0.0.1:{port}/x.png': .*refused"):
        fetch_url(f"http://127.0.0.1:{port}/x.png", timeout=5)
