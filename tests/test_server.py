"""`vlm serve`: the official `openai` client against a real server subprocess on the bundled
demo model. Greedy answers must be the pipeline's (what `vlm describe` prints) token for
token, streamed or not, alone or in a batch; every refusal has OpenAI's error shape and its
status. One server serves the module; the engine's batching is also checked in-process,
where the batch's composition is under the test's control."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

try:  # the HTTP client the openai client itself depends on: httpx2 in openai 3, httpx before
    import httpx2 as httpx
except ImportError:
    import httpx
import pytest
import torch
from PIL import Image

from vlmcli.generate import SamplingOptions, Timings
from vlmcli.pipeline import Pipeline
from vlmcli.server.engine import Delta, Engine, Failed, Finished, Job
from vlmcli.server.stops import StopFilter
from vlmcli.sequence import assistant_message, user_message

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = [ROOT / "examples" / name for name in ("one_shape.png", "two_shapes.png", "shapes.png")]
PROMPT = "Describe this image."
KEY = "test-key-123"
MAX_BATCH, MAX_QUEUE = 4, 8  # room for the load test's 8 clients and a stream left behind
GREEDY = SamplingOptions(max_new_tokens=64, temperature=0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmcli", "serve", "-m", "demo", "-b", "cpu", "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        env={k: v for k, v in os.environ.items() if k != "VLM_API_KEY"},
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vlm serve exited with {proc.returncode}: {log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, port, log
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"vlm serve did not start: {log.read_text()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, port, log = start_server(
        tmp_path_factory.mktemp("serve"), "--api-key", KEY, "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE)
    )
    yield f"http://127.0.0.1:{port}", log
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load("demo", "cpu", download_progress=False)


@pytest.fixture(scope="module")
def expected(pipe):
    """The pipeline's greedy answer and its streamed pieces for each example image."""
    out = {}
    for path in EXAMPLES:
        pieces: list[str] = []
        answer = pipe.describe([path], PROMPT, GREEDY, on_text=pieces.append)
        assert "".join(pieces) == answer.text
        out[path.name] = answer
    return out


def data_url(path: Path | bytes, kind: str = "png") -> str:
    data = path if isinstance(path, bytes) else path.read_bytes()
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def image_messages(url: str, prompt: str = PROMPT) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]}]


def post(base: str, body, *, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(base + "/v1/chat/completions", content=body, headers={**headers, "Content-Type": "application/json"}, timeout=60, **kwargs)
    return httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=60, **kwargs)


def error(status: int, message: str, *, type: str = "invalid_request_error", param=None, code=None) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------------------- answers


@pytest.mark.parametrize("image", [p.name for p in EXAMPLES])
def test_completion_equals_the_pipeline(client, expected, image):
    answer = expected[image]
    got = client.chat.completions.create(model="demo", messages=image_messages(data_url(ROOT / "examples" / image)), temperature=0)
    assert got.object == "chat.completion" and got.model == "demo" and got.id.startswith("chatcmpl-")
    assert len(got.choices) == 1
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == answer.text
    assert got.choices[0].finish_reason == answer.finish_reason == "stop"
    assert got.usage.prompt_tokens == answer.prompt_tokens == 74
    assert got.usage.completion_tokens == len(answer.tokens)
    assert got.usage.total_tokens == answer.prompt_tokens + len(answer.tokens)
    assert got.usage.prompt_tokens_details.image_tokens == answer.image_tokens == 64


def test_known_answers(client):
    # the demo's answers, written out, so a change in both pipeline and server still shows
    texts = [
        client.chat.completions.create(model="demo", messages=image_messages(data_url(p)), temperature=0).choices[0].message.content
        for p in EXAMPLES
    ]
    assert texts == ["a purple square", "an orange circle and a green triangle", "a red circle, a yellow square and a blue triangle"]


def test_streaming_equals_the_pipeline(client, expected):
    answer = expected["shapes.png"]
    stream = client.chat.completions.create(
        model="demo", messages=image_messages(data_url(EXAMPLES[2])), temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.model == "demo" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    content = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert content == [p for p in _pieces(answer) if p]
    assert "".join(content) == answer.text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (74, len(answer.tokens))
    assert all(c.usage is None for c in chunks[:-1])


def _pieces(answer) -> list[str]:
    """What the pipeline's streaming decoder gives for the answer's tokens."""
    from vlmcli.checkpoint import demo_path
    from vlmcli.tokenizer import Tokenizer

    stream = Tokenizer.from_dir(demo_path()).stream_decoder()
    return [stream.push(t) for t in answer.tokens] + [stream.flush()]


def test_stream_wire_format_ends_with_done(server):
    base, _ = server
    body = {"model": "demo", "messages": image_messages(data_url(EXAMPLES[0])), "temperature": 0, "stream": True}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "a purple square"
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


def test_max_tokens_and_max_completion_tokens(client, expected):
    answer = expected["shapes.png"]
    messages = image_messages(data_url(EXAMPLES[2]))
    got = client.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=2)
    assert got.choices[0].finish_reason == "length" and got.usage.completion_tokens == 2
    assert got.choices[0].message.content == "a red"
    # the newer name wins over the older
    got = client.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=2, max_completion_tokens=4)
    assert got.usage.completion_tokens == 4 and got.choices[0].finish_reason == "length"
    assert answer.text.startswith(got.choices[0].message.content)


def test_stop_strings(client):
    messages = image_messages(data_url(EXAMPLES[2]))
    got = client.chat.completions.create(model="demo", messages=messages, temperature=0, stop=[" and", "zzz"])
    assert got.choices[0].message.content == "a red circle, a yellow square"
    assert got.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="demo", messages=messages, temperature=0, stop=", a y", stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "a red circle"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_the_pipelines(client, pipe):
    opts = SamplingOptions(max_new_tokens=40, temperature=1.5, top_p=0.9, seed=11)
    answer = pipe.describe([EXAMPLES[2]], PROMPT, opts)
    messages = image_messages(data_url(EXAMPLES[2]))
    for _ in range(2):
        got = client.chat.completions.create(model="demo", messages=messages, temperature=1.5, top_p=0.9, seed=11, max_tokens=40)
        assert got.choices[0].message.content == answer.text
        assert got.usage.completion_tokens == len(answer.tokens)


def test_text_parts_system_message_and_jpeg_webp(client, pipe):
    # a system message, the prompt as two text parts, the image as JPEG and as WebP
    img = Image.open(EXAMPLES[1]).convert("RGB")
    for kind, fmt in (("jpeg", "JPEG"), ("webp", "WEBP")):
        buf = io.BytesIO()
        img.save(buf, fmt, quality=95)
        messages = [
            {"role": "system", "content": "You describe pictures."},
            {"role": "user", "content": [
                {"type": "text", "text": "Describe "},
                {"type": "image_url", "image_url": {"url": data_url(buf.getvalue(), kind)}},
                {"type": "text", "text": "this image."},
            ]},
        ]
        ours = [{"role": "system", "content": "You describe pictures."}, user_message(PROMPT, 1)]
        ours[1]["content"] = [{"type": "text", "text": "Describe "}, {"type": "image"}, {"type": "text", "text": "this image."}]
        answer = pipe.ask(ours, [buf.getvalue()], GREEDY)
        got = client.chat.completions.create(model="demo", messages=messages, temperature=0)
        assert got.choices[0].message.content == answer.text
        assert got.usage.prompt_tokens == answer.prompt_tokens


def test_http_image_url(client, http_server, expected):
    base, routes = http_server
    data = EXAMPLES[1].read_bytes()

    def image(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    routes["/serve/two.png"] = image
    got = client.chat.completions.create(model="demo", messages=image_messages(base + "/serve/two.png"), temperature=0)
    assert got.choices[0].message.content == expected["two_shapes.png"].text
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=image_messages(base + "/serve/missing.png"))
    assert e.value.status_code == 400
    assert e.value.body == {"message": f"cannot fetch '{base}/serve/missing.png': HTTP 404 Not Found", "type": "invalid_request_error", "param": "messages", "code": "invalid_image"}


def test_models_and_health(client, server):
    models = client.models.list()
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [("demo", "model", "vlm")]
    health = httpx.get(server[0] + "/health").json()
    assert health == {"status": "ok", "model": "demo", "active": 0, "waiting": 0, "in_flight": 0, "max_batch": MAX_BATCH, "max_queue": MAX_QUEUE}


# ---------------------------------------------------------------------------- refusals


def test_api_key(server):
    base, _ = server
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    r = post(base, body, key=None)
    assert (r.status_code, r.json()) == error(401, "missing API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key")
    r = post(base, body, key="wrong")
    assert (r.status_code, r.json()) == error(401, "incorrect API key provided", code="invalid_api_key")
    r = httpx.get(base + "/v1/models")
    assert r.status_code == 401
    wrong = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    assert httpx.get(base + "/health").status_code == 200  # health needs no key


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404
    assert e.value.body == {"message": "the model 'gpt-4o' does not exist; this server serves 'demo'", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}


BAD_PNG = EXAMPLES[0].read_bytes()[:200]  # a PNG cut short


@pytest.mark.parametrize(
    "url, message, code",
    [
        (data_url(b"not an image at all"), "cannot read image 'image 1 (data URL)': not an image, or a format Pillow cannot decode", "invalid_image"),
        (data_url(BAD_PNG), "cannot read image 'image 1 (data URL)': the file is truncated", "invalid_image"),
        ("data:image/png;base64,@@@@", "image 1: the data URL's base64 data is not valid", "invalid_image_url"),
        ("data:image/gif;base64,R0lGOD", "image 1: unsupported data URL type 'image/gif' (use image/png, image/jpeg or image/webp)", "invalid_image_url"),
        ("data:image/png,abc", "image 1: the data URL must be base64-encoded (data:image/png;base64,...)", "invalid_image_url"),
        (str(EXAMPLES[0]), "image 1: local files are refused (start the server with --allow-local-files to allow them)", "local_files_refused"),
        (EXAMPLES[0].as_uri(), "image 1: local files are refused (start the server with --allow-local-files to allow them)", "local_files_refused"),
        ("ftp://example.com/a.png", "image 1: unsupported URL scheme 'ftp:' (use a data:, http: or https: URL)", "invalid_image_url"),
    ],
)
def test_bad_images(client, url, message, code):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=image_messages(url))
    assert e.value.status_code == 400
    param = "messages" if code == "invalid_image" else "messages[0].content[0].image_url.url"
    assert e.value.body == {"message": message, "type": "invalid_request_error", "param": param, "code": code}


def test_bad_requests(server):
    base, _ = server
    hi = [{"role": "user", "content": "hi"}]
    cases = [
        ({"model": "demo", "messages": hi, "n": 2}, error(400, "n must be 1: this server generates one choice per request", param="n", code="invalid_value")),
        ({"model": "demo", "messages": hi, "stop": list("abcde")}, error(400, "at most 4 stop sequences", param="stop", code="invalid_value")),
        ({"model": "demo", "messages": [{"role": "assistant", "content": "hi"}]}, error(400, "the last message must be a user message", param="messages")),
        ({"model": "demo", "messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}, *hi]},
         error(400, "images are accepted in user messages only, not in assistant messages", param="messages[0].content[0]")),
        ({"model": "demo", "messages": [{"role": "user", "content": "hi " * 600}]},
         error(400, "the prompt is 1205 tokens (0 of them for 0 image(s)) but the model's context is 512 tokens", param="messages", code="context_length_exceeded")),
        ({"model": "demo", "messages": hi, "temperature": 5}, error(422, "temperature: Input should be less than or equal to 2", param="temperature", code="invalid_value")),
        ({"model": "demo", "messages": []}, error(422, "messages: List should have at least 1 item after validation, not 0", param="messages", code="invalid_value")),
        ({"model": "demo"}, error(422, "messages: Field required", param="messages", code="invalid_value")),
        ({"model": "demo", "messages": [{"role": "robot", "content": "hi"}]},
         error(422, "messages[0].role: Input should be 'system', 'developer', 'user' or 'assistant'", param="messages[0].role", code="invalid_value")),
        ({"model": "demo", "messages": hi, "max_tokens": 0}, error(422, "max_tokens: Input should be greater than or equal to 1", param="max_tokens", code="invalid_value")),
    ]
    for body, want in cases:
        r = post(base, body)
        assert (r.status_code, r.json()) == want, body
    r = post(base, b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert r.json()["error"]["message"].startswith("the request body is not valid JSON: ")
    r = httpx.get(base + "/v1/nothing")
    assert (r.status_code, r.json()) == error(404, "no route GET /v1/nothing", code="not_found")


def test_body_too_large(server):
    base, _ = server
    from vlmcli.server.app import MAX_BODY_BYTES

    body = b'{"model": "demo", "messages": [{"role": "user", "content": "' + b"x" * MAX_BODY_BYTES + b'"}]}'
    r = post(base, body)
    assert (r.status_code, r.json()) == error(413, "the request body is larger than the limit of 67.7 MiB", code="request_too_large")


def test_queue_full(client, server, http_server, expected):
    """Requests hold their place while their image is fetched: with every place taken by a
    slow download, the next request is refused with 503; once the images arrive, every held
    request is answered."""
    base, _ = server
    url, routes = http_server
    release = threading.Event()
    data = EXAMPLES[0].read_bytes()

    def slow(handler):
        release.wait(30)
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    routes["/serve/slow.png"] = slow
    capacity = MAX_BATCH + MAX_QUEUE
    with ThreadPoolExecutor(capacity) as pool:
        held = [
            pool.submit(client.chat.completions.create, model="demo", messages=image_messages(url + "/serve/slow.png"), temperature=0)
            for _ in range(capacity)
        ]
        deadline = time.monotonic() + 20
        while httpx.get(base + "/health").json()["in_flight"] < capacity and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            with pytest.raises(openai.InternalServerError) as e:
                client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
            assert e.value.status_code == 503
            assert e.value.body == {"message": "the server is busy: every place in the queue is taken; retry later", "type": "server_error", "param": None, "code": "queue_full"}
        finally:
            release.set()
        assert [f.result().choices[0].message.content for f in held] == [expected["one_shape.png"].text] * capacity
    assert httpx.get(base + "/health").json()["in_flight"] == 0


# ---------------------------------------------------------------------------- load


def test_load_mixed_clients(client, server, expected):
    """32 requests from 8 clients at once (the issue's load test): streamed and not, over the three images, one client
    leaving mid-stream, one corrupt image, one oversized body. The good ones get the
    pipeline's answers, the bad ones their status, and the server is idle and healthy after."""
    base, _ = server
    from vlmcli.server.app import MAX_BODY_BYTES

    def good(i: int):
        path = EXAMPLES[i % 3]
        messages = image_messages(data_url(path))
        if i % 2:
            chunks = list(client.chat.completions.create(model="demo", messages=messages, temperature=0, stream=True))
            return path.name, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return path.name, client.chat.completions.create(model="demo", messages=messages, temperature=0).choices[0].message.content

    def leaves_mid_stream():
        body = {"model": "demo", "messages": image_messages(data_url(EXAMPLES[2])), "temperature": 0, "stream": True}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
            first = next(r.iter_lines())
        return "left", json.loads(first[6:])["choices"][0]["delta"]

    def corrupt():
        try:
            client.chat.completions.create(model="demo", messages=image_messages(data_url(b"\x89PNG garbage")))
        except openai.BadRequestError as e:
            return "corrupt", (e.status_code, e.code)

    def oversized():
        body = b'{"model": "demo", "messages": "' + b"y" * (MAX_BODY_BYTES + 10) + b'"}'
        return "oversized", post(base, body).status_code

    jobs = [lambda i=i: good(i) for i in range(21)]
    jobs[5], jobs[11], jobs[17] = leaves_mid_stream, corrupt, oversized
    jobs += [lambda i=i: good(i) for i in range(21, 32)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda f: f(), jobs))
    assert time.monotonic() - t0 < 60
    for name, got in results:
        if name == "left":
            assert got == {"role": "assistant", "content": ""}
        elif name == "corrupt":
            assert got == (400, "invalid_image")
        elif name == "oversized":
            assert got == 413
        else:
            assert got == expected[name].text, name
    assert sum(1 for name, _ in results if name.endswith(".png")) == 29
    deadline = time.monotonic() + 10
    while (health := httpx.get(base + "/health").json())["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health["status"] == "ok" and (health["active"], health["waiting"], health["in_flight"]) == (0, 0, 0)


# ---------------------------------------------------------------------------- the engine, in-process


def _run_jobs(engine: Engine, pipe: Pipeline, requests, cancel_after: int | None = None) -> list[list]:
    """Submit every request before the engine starts (so they join the first batches in this
    order) and collect each one's events."""
    events: list[list] = [[] for _ in requests]
    done = threading.Semaphore(0)
    jobs = []
    for i, (messages, images, opts) in enumerate(requests):
        seq, prepared = pipe.prepare_prompt(messages, images, Timings(), engine.context)

        def sink(event, i=i):
            events[i].append(event)
            if isinstance(event, Delta) and i == cancel_after:
                jobs[i].cancel()
            if isinstance(event, (Finished, Failed)):
                done.release()

        jobs.append(Job(seq, prepared, opts, sink))
        engine.reserve()
        engine.submit(jobs[-1])
    engine.start()
    try:
        for _ in requests:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    return events


def test_batched_greedy_tokens_equal_alone(pipe):
    """Six prompts of different lengths (two text-only) through a batch of 3: rows at
    different positions, sequences leaving (rows compacted) and new ones joining mid-batch.
    Each answer is token for token the pipeline's own, alone."""
    prompts = [
        (EXAMPLES[2], PROMPT),
        (EXAMPLES[0], "What colour is the square?"),
        (None, "Describe a picture with a red circle and a very long sentence after it."),
        (EXAMPLES[1], PROMPT),
        (None, "hi"),
        (EXAMPLES[2], "How many shapes are there?"),
    ]
    requests, alone = [], []
    for image, prompt in prompts:
        images = [image] if image else []
        messages = [user_message(prompt, len(images))]
        requests.append((messages, images, GREEDY))
        alone.append(pipe.ask(messages, images, GREEDY))
    events = _run_jobs(Engine(pipe, max_batch=3), pipe, requests)
    for got, want in zip(events, alone):
        final = got[-1]
        assert isinstance(final, Finished)
        assert final.tokens == want.tokens and final.text == want.text
        assert final.finish_reason == want.finish_reason and final.prompt_tokens == want.prompt_tokens
        assert "".join(e.text for e in got if isinstance(e, Delta)) == want.text
    assert any(len(w.tokens) > 5 for w in alone)  # some sequences decode many steps


def test_cancelled_job_leaves_and_frees_its_place(pipe):
    requests = [([user_message(PROMPT, 1)], [EXAMPLES[2]], GREEDY)] * 2
    engine = Engine(pipe, max_batch=2)
    events = _run_jobs(engine, pipe, requests, cancel_after=0)
    assert isinstance(events[0][-1], Failed) and events[0][-1].message == "the request was cancelled"
    assert sum(isinstance(e, Delta) for e in events[0]) == 1  # left at the next step boundary
    assert events[1][-1].text == "a red circle, a yellow square and a blue triangle"
    assert engine.stats()["in_flight"] == 0


def _one_at_a_time(engine: Engine, pipe: Pipeline, phases, opts: SamplingOptions = GREEDY) -> list[tuple[list, list, Job, Finished]]:
    """Each phase's requests submitted together; the next phase once they have finished."""
    engine.start()
    out = []
    try:
        for phase in phases:
            done = threading.Semaphore(0)
            jobs = []
            for messages, images in phase:
                seq, prepared = pipe.prepare_prompt(messages, images, Timings(), engine.context)
                events: list = []

                def sink(event, events=events):
                    events.append(event)
                    if isinstance(event, (Finished, Failed)):
                        done.release()

                jobs.append((messages, images, Job(seq, prepared, opts, sink), events))
                engine.reserve()
                engine.submit(jobs[-1][2])
            for _ in phase:
                assert done.acquire(timeout=60)
            out += [(messages, images, job, events[-1]) for messages, images, job, events in jobs]
    finally:
        engine.stop()
    return out


def held(job: Job, got: Finished) -> list[int]:
    """The slots a finished job's row wrote: its prompt and the answer tokens fed back."""
    return (job.seq.ids + got.tokens)[: job.pos]


def shared(a: list[int], b: list[int]) -> int:
    return next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))


def test_a_conversation_reuses_its_prefix(pipe):
    """The next request of a conversation (same image, the answer, a new question) prefills
    only what is new and runs no vision tower, taking the row that holds its history
    wherever that row went; a request whose first turn another row holds (its image too)
    reuses that; with an image no row holds, only the text before the image. Every answer
    is the pipeline's own, alone."""
    image, other, unseen = EXAMPLES[0], EXAMPLES[2], EXAMPLES[1]
    first = [user_message(PROMPT, 1)]
    a_text = pipe.ask(first, [image], GREEDY).text
    follow = first + [assistant_message(a_text), user_message("How many shapes are there?")]
    phases = [
        # A in row 1 finishes (3 tokens) before X in row 0 (11): B must take row 1's contents
        [(first, [other]), (first, [image])],
        [(follow, [image])],
        [(follow, [other])],
        [(follow, [unseen])],
    ]
    engine = Engine(pipe, max_batch=2)
    swaps = []
    engine._swap_rows = lambda a, b, n, swap=engine._swap_rows: (swaps.append((a, b)) if a != b and n else None, swap(a, b, n))
    results = _one_at_a_time(engine, pipe, phases)
    for messages, images, _, got in results:
        want = pipe.ask(messages, images, GREEDY)
        assert isinstance(got, Finished) and got.tokens == want.tokens and got.text == want.text
    (*_, x_job, x), (*_, a_job, a), (*_, b_job, b), (*_, c_job, c), (*_, d_job, d) = results
    assert swaps == [(0, 1), (0, 1)]  # B and C each took the other row

    assert x.cached_tokens == a.cached_tokens == 0 and a_job.timings.vision_ms > 0
    assert b.cached_tokens == shared(held(a_job, a), b_job.seq.ids) >= len(a_job.seq.ids)
    assert c.cached_tokens == shared(held(x_job, x), c_job.seq.ids) >= len(x_job.seq.ids)
    assert b_job.timings.vision_ms == c_job.timings.vision_ms == 0
    assert d.cached_tokens == d_job.seq.ids.index(pipe.config.image_token_id) and d_job.timings.vision_ms > 0


def test_prefix_reuse_with_mrope_positions(tmp_path_factory):
    """Qwen2-VL: the reused prefix holds an image, so the new part's 3-D positions start past
    the image's grid; the follow-up's answer is still the pipeline's own."""
    from tests.qwen2_vl_checkpoints import make_qwen2_vl_checkpoint

    qwen = Pipeline.load(str(make_qwen2_vl_checkpoint(tmp_path_factory.mktemp("qwen2vl"))), "cpu")
    opts = SamplingOptions(max_new_tokens=12, temperature=0.0)
    first = [user_message(PROMPT, 1)]
    follow = first + [assistant_message(qwen.ask(first, [EXAMPLES[2]], opts).text), user_message("And the colours?")]
    results = _one_at_a_time(Engine(qwen, max_batch=1), qwen, [[(first, [EXAMPLES[2]])], [(follow, [EXAMPLES[2]])]], opts)
    for messages, images, _, got in results:
        assert got.tokens == qwen.ask(messages, images, opts).tokens
    (*_, a_job, a), (*_, b_job, b) = results
    assert b.cached_tokens == shared(held(a_job, a), b_job.seq.ids) >= len(a_job.seq.ids) and b_job.timings.vision_ms == 0
    assert b_job.offset != 0  # M-RoPE: positions are not the slots


def test_images_in_another_layout_are_told_apart_as_a_whole():
    """A family whose pixels are not one row per view (Llama 3.2 Vision: images x tiles) gets
    one digest over all its images: equal prompts share every slot, others only the text."""
    from vlmcli.processor import PreparedImages
    from vlmcli.server.engine import _contents

    def prepared(seed: int) -> PreparedImages:
        pixels = torch.rand(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        return PreparedImages(pixels, [(8, 8)], [4], [3])

    ids = [1, 2, 9, 9, 9, 3]
    same, other = _contents(ids, 9, prepared(0)), _contents(ids, 9, prepared(1))
    assert same == _contents(ids, 9, prepared(0)) and same[:2] == other[:2] == [1, 2]
    assert same[2] != other[2] and same[5] == other[5] == 3


def test_stop_filter_holds_back_possible_starts():
    f = StopFilter(["</end>", "STOP"])
    assert [f.push(p) for p in ["ab", "c<", "/e", "x", "S", "TO", "P", "more"]] == ["ab", "c", "", "</ex", "", "", "", ""]
    assert f.stopped and f.text == "abc</ex"
    g = StopFilter([])
    assert g.push("a") == "a" and g.flush() == ""
    h = StopFilter(["xyz"])
    assert h.push("ax") == "a" and h.flush() == "x"


# ---------------------------------------------------------------------------- lifecycle


@pytest.mark.slow
def test_sigterm_finishes_running_requests_and_exits_0(tmp_path):
    """Anywhere but loopback without a key: a warning. SIGTERM with a request running: the
    request is answered, new connections are refused, exit 0."""
    proc, port, log = start_server(tmp_path, "--host", "0.0.0.0", "--max-batch", "2")
    try:
        assert "warning: listening on 0.0.0.0 without an API key" in log.read_text()
        base = f"http://127.0.0.1:{port}"
        body = {"model": "demo", "messages": image_messages(data_url(EXAMPLES[2])), "temperature": 0, "stream": True}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert json.loads(next(lines)[6:])["choices"][0]["delta"]["role"] == "assistant"
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in rest[:-1])
        assert text == "a red circle, a yellow square and a blue triangle"
        assert proc.wait(30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(base + "/health", timeout=2)
        assert log.read_text().rstrip().endswith("stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
