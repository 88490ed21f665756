"""`--max-tiles`: the tile count users of InternVL set, through describe; refused with one
line for a family that does not tile by count."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from tests.internvl_checkpoints import make_internvl_checkpoint  # noqa: E402
from vlmcli.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    return make_internvl_checkpoint(tmp_path_factory.mktemp("internvl") / "m")


def _describe(capsys, *args):
    code = main(["describe", *map(str, args), "-b", "cpu", "--max-tokens", "2", "--json"])
    out, err = capsys.readouterr()
    return code, out, err


def test_max_tiles_sets_the_tile_count(capsys, internvl, make_test_image):
    image = make_test_image(size=(96, 32))  # wide: several tiles by default
    code, out, _ = _describe(capsys, image, "-m", internvl)
    assert code == 0
    tiles = json.loads(out)["image_tokens"] // 16  # 16 tokens a tile (32 px tiles, patch 4, shuffle 0.5)
    assert tiles == 4  # 3 tiles + thumbnail
    code, out, _ = _describe(capsys, image, "-m", internvl, "--max-tiles", "1")
    assert code == 0 and json.loads(out)["image_tokens"] == 16  # one view, no thumbnail
    code, out, _ = _describe(capsys, image, "-m", internvl, "--max-tiles", "2")
    assert code == 0 and json.loads(out)["image_tokens"] == 3 * 16  # 2 tiles + thumbnail


def test_max_tiles_refused_where_images_are_not_tiled_by_count(capsys, llava_ckpt, test_image):
    code, out, err = _describe(capsys, test_image, "-m", llava_ckpt, "--max-tiles", "2")
    assert (code, out) == (2, "")
    assert err == "error: --max-tiles applies to models that cut images into a number of tiles (InternVL); LLaVA does not\n"
