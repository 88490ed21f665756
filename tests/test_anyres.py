"""Anyres (LLaVA-NeXT, LLaVA-OneVision) without a model: pixel values bit-identical to
transformers' image processors, and visual token counts equal to its processors' counts,
at the real checkpoints' sizes (336 px / 384 px tiles, their grids) over many image shapes.

transformers picks LlavaNextImageProcessorPil / LlavaOnevisionImageProcessorPil here (no
torchvision installed); those are the references.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlmcli.config import MultiModalConfig  # noqa: E402
from vlmcli.preprocess import ImageProcessorConfig, anyres_views, preprocess_anyres  # noqa: E402

from tests.checkpoints import CLIP_MEAN, CLIP_STD  # noqa: E402
from tests.family_checkpoints import HUB_NEXT_PINPOINTS as NEXT_PINPOINTS  # noqa: E402
from tests.family_checkpoints import HUB_ONEVISION_PINPOINTS as ONEVISION_PINPOINTS  # noqa: E402

# llava-hf/llava-v1.6-*-hf/preprocessor_config.json
NEXT_PREPROCESSOR = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_grid_pinpoints": NEXT_PINPOINTS,
    "image_mean": list(CLIP_MEAN),
    "image_std": list(CLIP_STD),
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 336},
}
# llava-hf/llava-onevision-qwen2-0.5b-ov-hf/preprocessor_config.json
ONEVISION_PREPROCESSOR = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_grid_pinpoints": ONEVISION_PINPOINTS,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"height": 384, "width": 384},
}

# (width, height): square, landscape, portrait, extreme, tiny, odd, and past the largest grid
SIZES = [(336, 336), (640, 480), (480, 640), (1024, 899), (2000, 300), (300, 2000), (17, 23), (1111, 777), (3000, 2900)]


def _image(size, seed=0):
    g = torch.Generator().manual_seed(seed)
    from PIL import Image

    w, h = size
    data = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
    return Image.frombytes("RGB", (w, h), data.numpy().tobytes())


@pytest.mark.parametrize("size", SIZES, ids=str)
def test_llava_next_pixels_are_transformers(size):
    ref = transformers.LlavaNextImageProcessorPil(**NEXT_PREPROCESSOR)
    image = _image(size)
    out = ref(images=[image], return_tensors="pt")
    ours = preprocess_anyres(image, ImageProcessorConfig.from_dict(NEXT_PREPROCESSOR))
    assert out["image_sizes"][0].tolist() == [size[1], size[0]]
    assert torch.equal(ours, out["pixel_values"][0, : ours.shape[0]])
    assert ours.shape[0] == out["pixel_values"].shape[1]  # one image: nothing padded


@pytest.mark.parametrize("size", SIZES[:6], ids=str)
def test_llava_onevision_pixels_are_transformers(size):
    ref = transformers.LlavaOnevisionImageProcessorPil(**ONEVISION_PREPROCESSOR)
    image = _image(size, seed=1)
    cfg = ImageProcessorConfig.from_dict(ONEVISION_PREPROCESSOR)
    out = ref(images=[image], return_tensors="pt")
    ours = preprocess_anyres(image, cfg)
    assert torch.equal(ours, out["pixel_values"][0, : ours.shape[0]])
    # several images in one prompt: base view only, padded square with the mean colour
    other = _image((50, 90), seed=2)
    out = ref(images=[[image, other]], return_tensors="pt")
    assert out["batch_num_images"].tolist() == [2]
    ours = torch.cat([preprocess_anyres(im, cfg, base_only=True) for im in (image, other)])
    assert torch.equal(ours, out["pixel_values"][:, 0])


def test_views_are_base_then_tiles_row_by_row():
    cfg = ImageProcessorConfig.from_dict(NEXT_PREPROCESSOR)
    views = anyres_views(_image((640, 480)), cfg)  # 4:3 -> the 672x672 grid, 2x2 tiles
    assert [v.size for v in views] == [(336, 336)] * 5


def _next_config():
    return MultiModalConfig.from_hf(
        {
            "model_type": "llava_next",
            "image_grid_pinpoints": NEXT_PINPOINTS,
            "text_config": {"model_type": "mistral", "vocab_size": 32064},
        }
    )


def _onevision_config():
    return MultiModalConfig.from_hf({"model_type": "llava_onevision", "text_config": {"model_type": "qwen2"}})


def _shapes():
    # every aspect ratio from 1:8 to 8:1 at several scales
    for w in (37, 200, 336, 500, 777, 1024, 1600, 2500):
        for h in (41, 150, 336, 480, 900, 1333, 2100, 3000):
            yield h, w


def _counting_processor(cls, image_processor, **kwargs):
    # the processors' count needs no tokenizer; build one without running __init__
    proc = cls.__new__(cls)
    proc.image_processor = image_processor
    for key, value in kwargs.items():
        setattr(proc, key, value)
    return proc


def test_llava_next_token_counts_are_the_processors():
    cfg = _next_config()
    proc = _counting_processor(
        transformers.LlavaNextProcessor,
        transformers.LlavaNextImageProcessorPil(**NEXT_PREPROCESSOR),
        patch_size=14,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
    )
    for h, w in _shapes():
        expected = proc._get_number_of_features(h, w, 336, 336) - 1  # "default" drops [CLS]
        assert cfg.image_tokens(h, w) == expected, (h, w)
    # by hand: a square image gets the 1x2 grid (24x48 features), unpadded to 24x24, then a
    # newline per row, after the base view's 576
    assert cfg.image_tokens(336, 336) == 576 + 24 * 24 + 24


def test_llava_onevision_token_counts_are_the_processors():
    cfg = _onevision_config()
    proc = _counting_processor(
        transformers.LlavaOnevisionProcessor,
        transformers.LlavaOnevisionImageProcessorPil(**ONEVISION_PREPROCESSOR),
        num_image_tokens=729,
        vision_aspect_ratio="anyres_max_9",
        vision_feature_select_strategy="full",
    )
    for h, w in _shapes():
        assert cfg.image_tokens(h, w) == proc._get_number_of_features(h, w, 384, 384), (h, w)
    # several images in one prompt: the base view's 729 tokens and one image_newline each
    assert cfg.image_tokens(900, 1600, n_images=3) == 730
