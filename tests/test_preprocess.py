"""vlmcli.preprocess: pixel values against transformers' image processors, and image loading.

The reference is transformers' PIL/numpy image processor (CLIPImageProcessorPil /
SiglipImageProcessorPil in transformers 5; the plain classes are the PIL ones in 4.x).
Our pixels are expected to be bit-identical to it, so the comparisons use exact equality.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image

from vlmcli.errors import CheckpointError, ImageError
from vlmcli.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageProcessorConfig,
    load_image,
    load_image_with_notes,
    preprocess,
    preprocess_batch,
)

try:
    from transformers import CLIPImageProcessorPil as RefCLIP
    from transformers import SiglipImageProcessorPil as RefSiglip
except ImportError:  # transformers 4.x: the default classes are the PIL ones
    from transformers import CLIPImageProcessor as RefCLIP
    from transformers import SiglipImageProcessor as RefSiglip

from tests.checkpoints import CLIP_MEAN, CLIP_STD  # noqa: E402

# llava-hf/llava-1.5-7b-hf's preprocessor_config.json
LLAVA15 = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": list(CLIP_MEAN),
    "image_processor_type": "CLIPImageProcessor",
    "image_std": list(CLIP_STD),
    "processor_class": "LlavaProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}
TINY_CLIP = {**LLAVA15, "size": {"shortest_edge": 30}, "crop_size": {"height": 30, "width": 30}}
# google/siglip-so400m-patch14-384 style: exact resize, no crop keys at all
SIGLIP384 = {
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "SiglipProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 384, "width": 384},
}
# crop larger than the resized image on one side: transformers zero-pads before cropping
PAD_CLIP = {**LLAVA15, "size": {"shortest_edge": 20}, "crop_size": {"height": 31, "width": 24}}
NO_NORMALIZE = {**TINY_CLIP, "do_normalize": False}
NO_RESCALE = {**TINY_CLIP, "do_rescale": False}

CONFIGS = {
    "llava15": (RefCLIP, LLAVA15),
    "tiny_clip": (RefCLIP, TINY_CLIP),
    "siglip384": (RefSiglip, SIGLIP384),
    "pad_clip": (RefCLIP, PAD_CLIP),
    "no_normalize": (RefCLIP, NO_NORMALIZE),
    "no_rescale": (RefCLIP, NO_RESCALE),
}
# (width, height): wide and tall with odd sizes, exact, smaller than the target (upscaling)
SIZES = [(401, 173), (173, 401), (336, 336), (640, 480), (20, 13), (7, 2), (1, 1)]


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Random pixels: the hardest case for resampling (bicubic overshoots get clipped)."""
    channels = len(mode)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(a, mode) if channels > 1 else Image.fromarray(a[..., 0], mode)


def reference(ref_cls, d: dict, image: Image.Image) -> torch.Tensor:
    out = ref_cls(**d)(images=image, return_tensors="pt")["pixel_values"][0]
    return out.float()  # uint8 when neither rescaled nor normalized


def assert_exact(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == torch.float32
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff == 0.0, f"max abs diff {diff}"


# --------------------------------------------------------------------------- vs transformers


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_transformers(config, size):
    ref_cls, d = CONFIGS[config]
    img = noise_image(*size, seed=size[0] * 1000 + size[1])
    assert_exact(preprocess(img, ImageProcessorConfig.from_dict(d)), reference(ref_cls, d, img))


@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 90), height=st.integers(1, 90), seed=st.integers(0, 2**16))
def test_matches_transformers_any_size(width, height, seed):
    img = noise_image(width, height, seed)
    assert_exact(preprocess(img, ImageProcessorConfig.from_dict(TINY_CLIP)), reference(RefCLIP, TINY_CLIP, img))


def test_smooth_image_matches_transformers():
    # a gradient exercises the interpolation itself rather than clipping
    x = np.linspace(0, 255, 401)
    y = np.linspace(0, 255, 173)[:, None]
    a = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1).astype(np.uint8)
    img = Image.fromarray(a, "RGB")
    assert_exact(preprocess(img, ImageProcessorConfig.from_dict(LLAVA15)), reference(RefCLIP, LLAVA15, img))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P"])
def test_non_rgb_pil_input_matches_transformers(mode):
    img = noise_image(45, 37, mode="RGBA" if mode == "P" else mode)
    if mode == "P":
        img = img.convert("RGB").quantize(16)
        img.info["transparency"] = 3
    assert_exact(preprocess(img, ImageProcessorConfig.from_dict(TINY_CLIP)), reference(RefCLIP, TINY_CLIP, img))


def test_config_file_matches_transformers_from_pretrained(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(LLAVA15))
    cfg = ImageProcessorConfig.from_file(tmp_path / "preprocessor_config.json")
    ref = RefCLIP.from_pretrained(tmp_path)
    img = noise_image(123, 77)
    assert_exact(preprocess(img, cfg), ref(images=img, return_tensors="pt")["pixel_values"][0])


def test_batch():
    cfg = ImageProcessorConfig.from_dict(TINY_CLIP)
    images = [noise_image(40, 31, 1), noise_image(17, 50, 2)]
    batch = preprocess_batch(images, cfg)
    assert batch.shape == (2, 3, 30, 30)
    assert torch.equal(batch[1], preprocess(images[1], cfg))


def test_batch_of_unequal_sizes_is_refused():
    cfg = ImageProcessorConfig.from_dict({"do_resize": False, "do_center_crop": False})
    assert cfg.output_size is None
    with pytest.raises(CheckpointError, match="same size"):
        preprocess_batch([noise_image(4, 5), noise_image(5, 4)], cfg)


# --------------------------------------------------------------------------- config


def test_config_from_llava_dict():
    cfg = ImageProcessorConfig.from_dict(LLAVA15)
    assert cfg.size == 336 and cfg.crop_size == (336, 336) and cfg.do_center_crop
    assert cfg.image_mean == tuple(CLIP_MEAN) and cfg.image_std == tuple(CLIP_STD)
    assert cfg.resample == 3 and cfg.image_processor_type == "CLIPImageProcessor"
    assert cfg.output_size == (336, 336)


def test_config_siglip_without_crop_keys_does_not_crop():
    cfg = ImageProcessorConfig.from_dict(SIGLIP384)
    assert cfg.size == (384, 384) and not cfg.do_center_crop
    assert cfg.output_size == (384, 384)


def test_config_old_style_ints_and_defaults():
    cfg = ImageProcessorConfig.from_dict({"size": 224, "crop_size": 224, "image_mean": None, "unknown": 1})
    assert cfg.size == 224 and cfg.crop_size == (224, 224) and cfg.do_center_crop
    # no statistics in the checkpoint: the seed's ImageNet ones
    assert cfg.image_mean == IMAGENET_MEAN and cfg.image_std == IMAGENET_STD
    assert ImageProcessorConfig.from_dict({"image_std": 0.5}).image_std == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    "d",
    [
        {"size": {"longest_edge": 10}},
        {"size": "big"},
        {"crop_size": {"height": 0, "width": 3}},
        {"image_mean": [0.5, 0.5]},
        {"image_std": [1, 0, 1]},
        {"resample": 9},
        {"do_resize": "yes"},
    ],
)
def test_config_bad_values(d):
    with pytest.raises(CheckpointError):
        ImageProcessorConfig.from_dict(d)


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        ImageProcessorConfig.from_file(tmp_path / "missing.json")
    bad = tmp_path / "preprocessor_config.json"
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        ImageProcessorConfig.from_file(bad)
    bad.write_text(json.dumps({"size": {"max_height": 3}}))
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        ImageProcessorConfig.from_file(bad)


# --------------------------------------------------------------------------- loading


def save(img: Image.Image, path, **kwargs) -> str:
    img.save(path, **kwargs)
    return str(path)


def test_plain_rgb_from_path_and_bytes(tmp_path):
    img = noise_image(9, 7)
    path = save(img, tmp_path / "a.png")
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(img))
    with open(path, "rb") as f:
        loaded = load_image_with_notes(f.read())
    assert loaded.image.mode == "RGB" and loaded.notes == []
    assert np.array_equal(np.asarray(loaded.image), np.asarray(img))


def test_exif_orientation_is_applied(tmp_path):
    # left half red, right half blue; Orientation 6 means "rotate 90 degrees clockwise to view"
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    loaded = np.asarray(load_image(save(img, tmp_path / "rot.jpg", exif=exif, quality=95)), dtype=int)
    assert loaded.shape == (40, 20, 3)  # now portrait
    assert np.abs(loaded[5, 10] - (255, 0, 0)).max() < 8  # the left half is now on top
    assert np.abs(loaded[35, 10] - (0, 0, 255)).max() < 8


def test_palette_with_transparency_goes_on_white(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)  # index 0 black (transparent), 1 green
    img.putpixel((1, 1), 1)
    a = np.asarray(load_image(save(img, tmp_path / "p.png", transparency=0)))
    assert tuple(a[0, 0]) == (255, 255, 255)
    assert tuple(a[1, 1]) == (0, 255, 0)


def test_rgba_transparent_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (3, 1), (0, 0, 0, 0))
    img.putpixel((1, 0), (255, 0, 0, 255))
    img.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black over white: mid grey
    a = np.asarray(load_image(save(img, tmp_path / "rgba.png")))
    assert tuple(a[0, 0]) == (255, 255, 255)
    assert tuple(a[0, 1]) == (255, 0, 0)
    assert all(abs(int(v) - 127) <= 1 for v in a[0, 2])


def test_rgba_file_matches_transformers(tmp_path):
    # transformers composites on white too, so load_image + preprocess == reference on the raw file
    path = save(noise_image(33, 41, mode="RGBA"), tmp_path / "noise.png")
    with Image.open(path) as raw:
        ref = reference(RefCLIP, TINY_CLIP, raw)
    assert_exact(preprocess(load_image(path), ImageProcessorConfig.from_dict(TINY_CLIP)), ref)


def test_la(tmp_path):
    img = Image.new("LA", (2, 1), (0, 0))
    img.putpixel((1, 0), (50, 255))
    a = np.asarray(load_image(save(img, tmp_path / "la.png")))
    assert tuple(a[0, 0]) == (255, 255, 255)
    assert tuple(a[0, 1]) == (50, 50, 50)


@pytest.mark.parametrize("icc", [None, b"not a real ICC profile"])
def test_cmyk_jpeg(tmp_path, icc):
    img = Image.new("CMYK", (32, 32), (255, 0, 0, 0))  # cyan
    img.paste((0, 0, 0, 0), (16, 0, 32, 16))  # white
    img.paste((0, 0, 0, 255), (16, 16, 32, 32))  # black
    kwargs = {"icc_profile": icc} if icc else {}
    # a broken embedded profile falls back to the plain conversion instead of failing
    a = np.asarray(load_image(save(img, tmp_path / "cmyk.jpg", quality=95, **kwargs)), dtype=int)
    assert np.abs(a[8, 8] - (0, 255, 255)).max() < 8
    assert np.abs(a[8, 24] - (255, 255, 255)).max() < 8
    assert np.abs(a[24, 24] - (0, 0, 0)).max() < 8


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / "deep.png")
    with Image.open(path) as raw:
        assert raw.mode in ("I;16", "I")  # I in older Pillow
    loaded = load_image_with_notes(path)
    a = np.asarray(loaded.image)
    assert a[0, :, 0].tolist() == [0, 4, 128, 255]
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all()
    assert loaded.notes == []


def test_float_images(tmp_path):
    unit = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    loaded = load_image_with_notes(save(Image.fromarray(unit), tmp_path / "unit.tiff"))
    assert np.asarray(loaded.image)[0, :, 0].tolist() == [0, 128, 255] and loaded.notes == []
    # no nominal range: stretched, and said so
    wide = np.array([[-1.0, 1.0, 3.0]], dtype=np.float32)
    loaded = load_image_with_notes(save(Image.fromarray(wide), tmp_path / "wide.tiff"))
    assert np.asarray(loaded.image)[0, :, 0].tolist() == [0, 128, 255]
    assert "stretched" in loaded.notes[0]


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_image_gives_first_frame_and_a_note(tmp_path, fmt):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kwargs)
    loaded = load_image_with_notes(path)
    assert tuple(np.asarray(loaded.image)[4, 4]) == (255, 0, 0)
    assert len(loaded.notes) == 1 and "3 frames" in loaded.notes[0]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_names_the_file(tmp_path, fmt):
    buf = io.BytesIO()
    noise_image(64, 64).save(buf, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match=f"cannot read image '{path}'"):
        load_image(path)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageError, match=f"cannot read image '{path}': not an image"):
        load_image(path)
    with pytest.raises(ImageError, match="<bytes>"):
        load_image(b"plain bytes")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


@pytest.mark.parametrize("max_pixels", [1000, 6000])  # over twice the limit (Pillow's error), and between
def test_decompression_bomb(tmp_path, max_pixels):
    path = save(noise_image(100, 100), tmp_path / "big.png")
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match=rf"'{path}'.*limit of {max_pixels} pixels"):
        load_image(path, max_pixels=max_pixels)
    assert Image.MAX_IMAGE_PIXELS == before  # Pillow's global limit is restored
    assert load_image(path, max_pixels=10_000).size == (100, 100)


def test_decompression_bomb_default_limit_is_pillows(tmp_path, monkeypatch):
    path = save(noise_image(100, 100), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(ImageError, match="limit of 5000 pixels"):
        load_image(path)
