"""`--max-pixels` / `--min-pixels` for describe and chat: the pixel budget of models that
resize images to one (Qwen2-VL), with the image token count Qwen2VLImageProcessor gives
for the same budget; the large-image notice and the context refusal with both numbers;
one-line refusals elsewhere and for a budget that cannot be."""

from __future__ import annotations

import io
import json
import re
import sys

import pytest

pytest.importorskip("transformers")

from tests.qwen2_vl_checkpoints import MAX_PIXELS, MIN_PIXELS, make_qwen2_vl_checkpoint, reference_processor  # noqa: E402
from vlmcli.cli import main  # noqa: E402

TOKEN = 28 * 28  # pixels per visual token: 14 px patches, 2x2 merged
LLAVA_REFUSAL = (
    "error: --min-pixels / --max-pixels apply to models that take images at a pixel budget (Qwen2-VL); "
    "LLaVA does not\n"
)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_qwen2_vl_checkpoint(tmp_path_factory.mktemp("qwen2vl-cli") / "m")


def _describe(capsys, *args):
    code = main(["describe", *map(str, args), "-b", "cpu", "--max-tokens", "2", "--json"])
    out, err = capsys.readouterr()
    return code, out, err


def _reference_tokens(path, image, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS) -> int:
    """Visual tokens of transformers' Qwen2VLImageProcessor at this budget: t * h * w / 4."""
    from PIL import Image

    with Image.open(image) as im:
        rgb = im.convert("RGB")
    out = reference_processor(path).image_processor(
        images=[rgb], size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, return_tensors="pt"
    )
    t, h, w = out["image_grid_thw"][0].tolist()
    return t * h * w // 4


@pytest.mark.parametrize(
    "size,flags,budget",
    [
        ((160, 120), [], (MIN_PIXELS, MAX_PIXELS)),  # the checkpoint's own budget: 24 tokens
        ((160, 120), ["--max-pixels", 8 * TOKEN], (MIN_PIXELS, 8 * TOKEN)),
        ((160, 120), ["--max-pixels", 5000], (MIN_PIXELS, 5000)),  # not a multiple of 784
        ((30, 30), ["--min-pixels", 9 * TOKEN], (9 * TOKEN, MAX_PIXELS)),  # scaled up
        ((90, 50), ["--min-pixels", 2 * TOKEN, "--max-pixels", 3 * TOKEN], (2 * TOKEN, 3 * TOKEN)),
        ((600, 410), ["--max-pixels", 64 * TOKEN], (MIN_PIXELS, 64 * TOKEN)),
    ],
)
def test_pixel_budget_sets_the_token_count_as_transformers(capsys, qwen, make_test_image, size, flags, budget):
    image = make_test_image(size=size, seed=4)
    code, out, err = _describe(capsys, image, "-m", qwen, *flags)
    assert code == 0, err
    expected = _reference_tokens(qwen, image, *budget)
    assert json.loads(out)["image_tokens"] == expected


def test_pixel_budget_changes_the_token_count(capsys, qwen, make_test_image):
    image = make_test_image(size=(160, 120), seed=4)
    counts = []
    for flags in ([], ["--max-pixels", 12 * TOKEN], ["--max-pixels", 4 * TOKEN]):
        code, out, _ = _describe(capsys, image, "-m", qwen, *flags)
        assert code == 0
        counts.append(json.loads(out)["image_tokens"])
    # 160x120 -> 168x112 (6x4 tokens); a budget of 12 tokens -> 112x84 (4x3); of 4 tokens -> 56x28 (2x1)
    assert counts == [24, 12, 2]


def test_large_image_notice_and_context_refusal(capsys, qwen, make_test_image):
    """A budget past the context: the notice says the count, the refusal says both numbers
    (exit 1); a smaller --max-pixels fits."""
    image = make_test_image(size=(1100, 900), seed=1)
    big = 28 * 28 * 2048
    tokens = _reference_tokens(qwen, image, MIN_PIXELS, big)
    assert tokens > 1024
    code, out, err = _describe(capsys, image, "-m", qwen, "--max-pixels", big)
    assert (code, out) == (1, "")
    side = re.search(r"visual tokens \((\d+x\d+) px\)", err).group(1)
    assert f"a 1100x900 image becomes {tokens} visual tokens ({side} px); --max-pixels lowers that (now {big})" in err
    match = re.search(r"error: the prompt is (\d+) tokens \((\d+) of them for 1 image\(s\)\) but the model's "
                      r"context is 512 tokens \(--max-pixels makes images fewer tokens\)\n$", err)
    assert match, err
    assert int(match.group(2)) == tokens and int(match.group(1)) > tokens
    code, out, err = _describe(capsys, image, "-m", qwen, "--max-pixels", 256 * TOKEN)
    assert code == 0 and "visual tokens" not in err
    assert json.loads(out)["image_tokens"] == _reference_tokens(qwen, image, MIN_PIXELS, 256 * TOKEN)


def test_budget_that_cannot_be_is_a_usage_error(capsys, qwen, test_image):
    code, out, err = _describe(capsys, test_image, "-m", qwen, "--min-pixels", 5000, "--max-pixels", 4000)
    assert (code, out, err) == (2, "", "error: --min-pixels 5000 is more than --max-pixels 4000\n")
    code, out, err = _describe(capsys, test_image, "-m", qwen, "--max-pixels", 1000)
    assert (code, out, err) == (2, "", f"error: the model's min_pixels {MIN_PIXELS} is more than --max-pixels 1000\n")
    code, out, err = _describe(capsys, test_image, "-m", qwen, "--max-pixels", 0)
    assert code == 2 and out == "" and "--max-pixels" in err


def test_pixels_refused_where_images_are_not_resized_to_a_budget(capsys, llava_ckpt, test_image):
    for flags in (["--max-pixels", 100000], ["--min-pixels", 1000]):
        code, out, err = _describe(capsys, test_image, "-m", llava_ckpt, *flags)
        assert (code, out, err) == (2, "", LLAVA_REFUSAL)


def _chat(monkeypatch, capsys, lines, *args):
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    code = main(["chat", *map(str, args), "-b", "cpu", "--max-tokens", "2"])
    out, err = capsys.readouterr()
    return code, out, err


def test_chat_takes_the_pixel_budget(monkeypatch, capsys, qwen, llava_ckpt, make_test_image):
    image = make_test_image(size=(1100, 900), seed=1)
    budget = 28 * 28 * 1100
    tokens = _reference_tokens(qwen, image, MIN_PIXELS, budget)
    code, out, err = _chat(monkeypatch, capsys, "", "-m", qwen, "-i", image, "--max-pixels", budget)
    assert code == 0, err
    assert f"image becomes {tokens} visual tokens" in err and f"(now {budget})" in err
    code, out, err = _chat(monkeypatch, capsys, "", "-m", qwen, "-i", image, "--max-pixels", 64 * TOKEN)
    assert code == 0 and "visual tokens" not in err
    code, out, err = _chat(monkeypatch, capsys, "hi\n", "-m", llava_ckpt, "--max-pixels", 1000)
    assert (code, out, err) == (2, "", LLAVA_REFUSAL)
