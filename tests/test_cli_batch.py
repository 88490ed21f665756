"""`vlm describe` over many images keeps going past bad ones; tiny images, empty answers and
the pixel limit are said, not silent. On the bundled demo model (it loads in about a second)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from vlmcli.cli import main
from vlmcli.generate import SamplingOptions
from vlmcli.pipeline import Pipeline

PROMPT = "Describe this image."
BOMB_HINT = "(if you trust the file, raise the limit with --max-image-pixels N or VLM_MAX_IMAGE_PIXELS=N)"


def run(capsys, *args):
    code = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def demo():
    return Pipeline.load("demo", "cpu")


def answer(demo, path):
    return demo.describe([path], PROMPT, SamplingOptions(max_new_tokens=24)).text


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """good ones (shapes the demo model knows), a missing file, a text file, a truncated PNG
    (its header is fine: it fails only when decoded) and a 1x1 picture."""
    folder = tmp_path_factory.mktemp("batch")
    paths = {}
    for name, colour in (("a", (220, 30, 30)), ("b", (30, 30, 220)), ("c", (30, 160, 30))):
        img = Image.new("RGB", (64, 64), (255, 255, 255))
        img.paste(colour, (16, 16, 48, 48))
        paths[name] = folder / f"{name}.png"
        img.save(paths[name])
    paths["missing"] = folder / "missing.png"
    paths["text"] = folder / "notes.png"
    paths["text"].write_text("not a picture\n")
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, "PNG")
    paths["cut"] = folder / "cut.png"
    paths["cut"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    paths["tiny"] = folder / "tiny.png"
    Image.new("RGB", (1, 1), (255, 0, 0)).save(paths["tiny"])
    return paths


def test_bad_images_are_error_lines_and_the_rest_are_described(capsys, demo, pictures):
    p = pictures
    code, out, err = run(capsys, "describe", p["a"], p["missing"], p["b"], p["cut"], p["c"], "-m", "demo", "--max-tokens", 24, "-q")
    assert code == 1
    # no header for the images that failed, not even the one that failed at its turn
    assert out == "".join(
        f"{sep}==> {p[n]} <==\n{answer(demo, p[n])}\n" for sep, n in (("", "a"), ("\n", "b"), ("\n", "c"))
    )
    assert err == (
        f"error: cannot read image '{p['missing']}': no such file\n"
        f"error: cannot read image '{p['cut']}': the file is truncated\n"
        "error: 2 of 5 images failed\n"
    )


def test_bad_images_are_json_records(capsys, demo, pictures):
    p = pictures
    args = [p["a"], p["missing"], p["text"], p["cut"], p["b"]]
    code, out, err = run(capsys, "describe", *args, "-m", "demo", "--max-tokens", 24, "--json", "-q")
    assert (code, err) == (1, "error: 3 of 5 images failed\n")
    records = [json.loads(line) for line in out.splitlines()]
    # what is found without decoding (a missing file, not an image) before the model loads,
    # the rest in order
    assert records[:2] == [
        {"image": str(p["missing"]), "error": f"cannot read image '{p['missing']}': no such file", "error_type": "missing"},
        {"image": str(p["text"]), "error": f"cannot read image '{p['text']}': not an image, or a format Pillow cannot decode",
         "error_type": "undecodable"},
    ]
    assert records[2]["image"] == str(p["a"]) and records[2]["text"] == answer(demo, p["a"])
    assert records[3] == {"image": str(p["cut"]), "error": f"cannot read image '{p['cut']}': the file is truncated",
                          "error_type": "undecodable"}
    assert records[4]["image"] == str(p["b"]) and records[4]["text"] == answer(demo, p["b"])


def test_all_bad_fails_before_the_model_loads(capsys, pictures, tmp_path):
    code, out, err = run(capsys, "describe", pictures["missing"], pictures["text"], "-m", tmp_path / "no-model")
    assert (code, out) == (1, "")
    assert err == (
        f"error: cannot read image '{pictures['missing']}': no such file\n"
        f"error: cannot read image '{pictures['text']}': not an image, or a format Pillow cannot decode\n"
        "error: 2 of 2 images failed\n"
    )


def test_one_bad_image_is_one_error(capsys, pictures):
    code, out, err = run(capsys, "describe", pictures["cut"], "-m", "demo")
    assert (code, out, err) == (1, "", f"error: cannot read image '{pictures['cut']}': the file is truncated\n")


def test_a_tiny_image_and_an_empty_answer_are_said(capsys, demo, pictures):
    tiny = pictures["tiny"]
    assert answer(demo, tiny) == ""  # the demo model has nothing to say about one red pixel
    code, out, err = run(capsys, "describe", tiny, "-m", "demo")
    assert (code, out) == (0, "\n")
    assert err == (
        f"{tiny}: the image is only 1x1 pixels; scaled up to the model's input size, it holds little to see\n"
        "(the model gave no text)\n"
    )
    code, out, err = run(capsys, "describe", tiny, pictures["a"], "-m", "demo")
    assert code == 0
    assert out == f"==> {tiny} <==\n\n\n==> {pictures['a']} <==\n{answer(demo, pictures['a'])}\n"
    assert err.endswith(f"{tiny}: (the model gave no text)\n")
    assert run(capsys, "describe", tiny, "-m", "demo", "-q") == (0, "\n", "")


def test_the_pixel_limit_is_an_option(capsys, monkeypatch, demo, pictures):
    a = pictures["a"]  # 64x64 = 4096 pixels
    before = Image.MAX_IMAGE_PIXELS
    code, out, err = run(capsys, "describe", a, "-m", "demo", "--max-image-pixels", 1000)
    assert (code, out) == (1, "")
    assert err == f"error: image '{a}' is larger than the limit of 1000 pixels (possible decompression bomb) {BOMB_HINT}\n"
    assert Image.MAX_IMAGE_PIXELS == before  # the limit ends with the command
    monkeypatch.setenv("VLM_MAX_IMAGE_PIXELS", "3000")  # between the limit and twice it: refused too
    code, out, err = run(capsys, "describe", a, "-m", "demo")
    assert (code, out) == (1, "") and "larger than the limit of 3000 pixels" in err
    code, out, err = run(capsys, "describe", a, "-m", "demo", "--max-image-pixels", 4096)
    assert (code, out, err) == (0, answer(demo, a) + "\n", "")
    # in a batch, the image over the limit is one record among the others
    code, out, err = run(capsys, "describe", a, pictures["tiny"], "-m", "demo", "--json", "-q")
    assert (code, err) == (1, "error: 1 of 2 images failed\n")
    record = json.loads(out.splitlines()[0])
    assert record == {
        "image": str(a),
        "error": f"image '{a}' is larger than the limit of 3000 pixels (possible decompression bomb) {BOMB_HINT}",
        "error_type": "too_large",
    }


def test_max_image_pixels_in_help(capsys):
    code, out, _ = run(capsys, "describe", "--help")
    assert code == 0 and "--max-image-pixels" in out and "VLM_MAX_IMAGE_PIXELS" in out
