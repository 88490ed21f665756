"""Image file -> pixel tensor, shared by every backend.

Two halves:

* loading (`load_image`, `load_image_with_notes`): decode an untrusted file safely into an
  8-bit RGB Pillow image. EXIF orientation is applied, transparency is composited on white,
  CMYK and high-bit-depth images are converted properly, animations keep their first frame,
  and Pillow's decompression-bomb limit stays on. Every failure is an ImageError naming the file.
* preprocessing (`preprocess`, `preprocess_batch`): what a Hugging Face CLIP / SigLIP image
  processor does for a `preprocessor_config.json` (resize, center crop, rescale, normalize),
  reproduced bit for bit: Pillow does the resize on the uint8 image, torch does the rest with
  the same float64 -> float32 arithmetic order as the reference.
* anyres views (`anyres_views`, `preprocess_anyres`): LLaVA-NeXT / OneVision's base view plus
  tiles, as transformers' LlavaNextImageProcessorPil / LlavaOnevisionImageProcessorPil make
  them (the classes it uses without torchvision, as here; the torchvision ones are meant to
  match them): the image resized into its best grid resolution (aspect kept), centred on
  black, cut into tiles; the whole image squashed to one tile for the base view. Each view
  then goes through `preprocess`.

numpy is deliberately not used: it is not a dependency of the package.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Sequence, Union

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # Little CMS ships with Pillow's wheels, but a source build may lack it.
    from PIL import ImageCms
except ImportError:  # pragma: no cover - depends on how Pillow was built
    ImageCms = None

from vlmcli import anyres
from vlmcli.errors import CheckpointError, ImageError

# How a user raises the decompression-bomb limit (Pillow's Image.MAX_IMAGE_PIXELS), named in
# the error that refuses a larger image (vlmcli/cli/options.py declares them).
MAX_PIXELS_OPTION = "--max-image-pixels"
MAX_PIXELS_ENV = "VLM_MAX_IMAGE_PIXELS"
# Images with a side shorter than this get a note (tiny_image_note): scaled up they hold next to nothing.
TINY_IMAGE_SIDE = 16

# The seed's statistics, used when a checkpoint's preprocessor config gives none.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# CLIP's own normalisation statistics (llava-1.5 uses CLIP ViT-L/14-336 unchanged).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# SigLIP's: every channel mapped from [0, 1] to [-1, 1].
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, what CLIP and SigLIP processors use
_RESAMPLE_FILTERS = {0, 1, 2, 3, 4, 5}  # NEAREST LANCZOS BILINEAR BICUBIC BOX HAMMING

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The preprocessing recipe from a checkpoint's `preprocessor_config.json`.

    `size` is either an int, the target length of the shortest edge (aspect ratio kept,
    CLIP style), or a `(height, width)` tuple, an exact output size (SigLIP style).
    The defaults are those of transformers' CLIPImageProcessor, except for the
    mean/std, which are the seed's ImageNet statistics.
    """

    do_resize: bool = True
    size: int | tuple[int, int] = 224
    resample: int = BICUBIC
    do_center_crop: bool = True
    crop_size: tuple[int, int] = (224, 224)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    do_convert_rgb: bool = True
    image_processor_type: str | None = None
    # anyres (LLaVA-NeXT / OneVision): candidate (height, width) resolutions, and the tile side
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    tile_size: int | None = None

    def __post_init__(self) -> None:
        size = (self.size,) if isinstance(self.size, int) else self.size
        for name, dims in (("size", size), ("crop_size", self.crop_size)):
            if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
                raise CheckpointError(f"image processor {name} must be positive integers, got {dims!r}")
        if self.resample not in _RESAMPLE_FILTERS:
            raise CheckpointError(f"unknown image processor resample filter {self.resample!r}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise CheckpointError("image_mean and image_std must have 3 values (one per RGB channel)")
        if any(s == 0 for s in self.image_std):
            raise CheckpointError(f"image_std must not contain 0, got {self.image_std!r}")

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every preprocessed image, or None if it depends on the input."""
        if self.do_center_crop:
            return self.crop_size
        if self.do_resize and isinstance(self.size, tuple):
            return self.size
        return None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageProcessorConfig":
        """Read a `preprocessor_config.json` dict; unknown keys (processor_class, ...) are ignored.

        A missing `do_center_crop` means "crop if a crop_size is given": real CLIP configs
        always carry both, real SigLIP configs carry neither (and must not be cropped).
        """
        if not isinstance(d, dict):
            raise CheckpointError(f"image processor config must be a JSON object, got {type(d).__name__}")
        # null in JSON means "not set" for transformers too
        d = {k: v for k, v in d.items() if v is not None}
        kwargs: dict[str, Any] = {}
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            if key in d:
                kwargs[key] = _parse_bool(key, d[key])
        if "size" in d:
            kwargs["size"] = _parse_size(d["size"])
        if "crop_size" in d:
            kwargs["crop_size"] = _parse_crop_size(d["crop_size"])
        kwargs.setdefault("do_center_crop", "crop_size" in d)
        if "resample" in d:
            kwargs["resample"] = _parse_int("resample", d["resample"])
        if "rescale_factor" in d:
            kwargs["rescale_factor"] = _parse_float("rescale_factor", d["rescale_factor"])
        for key in ("image_mean", "image_std"):
            if key in d:
                kwargs[key] = _parse_stats(key, d[key])
        if "image_processor_type" in d:
            kwargs["image_processor_type"] = str(d["image_processor_type"])
        if "image_grid_pinpoints" in d:
            kwargs["image_grid_pinpoints"] = _parse_pinpoints(d["image_grid_pinpoints"])
        # the anyres processors cut tiles of crop_size if the config gives one, else of size
        size = kwargs.get("size", cls.size)
        if "crop_size" in kwargs:
            kwargs["tile_size"] = kwargs["crop_size"][0]
        else:
            kwargs["tile_size"] = size[0] if isinstance(size, tuple) else size
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "ImageProcessorConfig":
        """Read a `preprocessor_config.json` file."""
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise CheckpointError(f"image processor config '{path}' not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"cannot read image processor config '{path}': {e}", hint="re-download the model"
            ) from None
        try:
            return cls.from_dict(d)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e.message}", hint=e.hint) from None


def _parse_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise CheckpointError(f"image processor {key} must be true or false, got {value!r}")
    return value


def _parse_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"image processor {key} must be an integer, got {value!r}")
    return value


def _parse_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"image processor {key} must be a number, got {value!r}")
    return float(value)


def _parse_stats(key: str, value: Any) -> tuple[float, float, float]:
    # transformers repeats a single number over the channels
    values = [value] * 3 if isinstance(value, (int, float)) else value
    if not isinstance(values, list) or len(values) != 3:
        raise CheckpointError(f"image processor {key} must be a number or 3 numbers, got {value!r}")
    return tuple(_parse_float(key, v) for v in values)  # type: ignore[return-value]


def _parse_pinpoints(value: Any) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list) or not value or not all(isinstance(p, list) and len(p) == 2 for p in value):
        raise CheckpointError(f"image processor image_grid_pinpoints must be [height, width] pairs, got {value!r}")
    return tuple((_parse_int("image_grid_pinpoints", h), _parse_int("image_grid_pinpoints", w)) for h, w in value)


def _parse_size(value: Any) -> int | tuple[int, int]:
    """`size` as transformers' CLIP/SigLIP processors read it (both use default_to_square=False)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # an old-style int is a shortest edge
    if isinstance(value, list) and len(value) == 2:
        return (_parse_int("size", value[0]), _parse_int("size", value[1]))
    if isinstance(value, dict):
        keys = {k for k, v in value.items() if v is not None}
        # transformers checks shortest_edge before height/width; longest_edge would change the rule
        if "shortest_edge" in keys and "longest_edge" not in keys:
            return _parse_int("size", value["shortest_edge"])
        if keys == {"height", "width"}:
            return (_parse_int("size", value["height"]), _parse_int("size", value["width"]))
    raise CheckpointError(
        f"unsupported image processor size {value!r}",
        hint="expected {'shortest_edge': N} or {'height': H, 'width': W}",
    )


def _parse_crop_size(value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)  # an old-style int crop is square
    if isinstance(value, list) and len(value) == 2:
        return (_parse_int("crop_size", value[0]), _parse_int("crop_size", value[1]))
    if isinstance(value, dict) and {k for k, v in value.items() if v is not None} == {"height", "width"}:
        return (_parse_int("crop_size", value["height"]), _parse_int("crop_size", value["width"]))
    raise CheckpointError(
        f"unsupported image processor crop_size {value!r}", hint="expected {'height': H, 'width': W}"
    )


# --------------------------------------------------------------------------- loading


class LoadedImage(NamedTuple):
    image: Image.Image  # 8-bit RGB
    notes: list[str]  # things worth telling the user, e.g. "animated GIF: used the first of 3 frames"


def load_image(
    source: ImageSource, *, max_pixels: int | None = None, name: str | None = None
) -> Image.Image:
    """Decode an image file (path or bytes) into an 8-bit RGB Pillow image. See `load_image_with_notes`."""
    return load_image_with_notes(source, max_pixels=max_pixels, name=name).image


def load_image_with_notes(
    source: ImageSource, *, max_pixels: int | None = None, name: str | None = None
) -> LoadedImage:
    """Decode an image file (path or bytes) into an 8-bit RGB Pillow image, plus notes.

    max_pixels: the decompression-bomb limit; None keeps Pillow's `Image.MAX_IMAGE_PIXELS`.
        Going over it is an error (Pillow itself only warns up to twice the limit).
    name: what error messages call the image; defaults to the path, or "<bytes>".
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = name or "<bytes>"
        fp: Any = io.BytesIO(source)
    else:
        name = name or os.fspath(source)
        fp = source
    if max_pixels is not None and max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")

    notes: list[str] = []
    with _pixel_limit(max_pixels) as limit, _read_errors(name, limit):
        with Image.open(fp) as img:
            img.load()  # decode now, so that truncation is caught here
            n_frames = getattr(img, "n_frames", 1)
            if n_frames > 1:
                notes.append(f"{img.format} image has {n_frames} frames; used the first")
            rgb = _to_rgb(ImageOps.exif_transpose(img), notes)
    return LoadedImage(rgb, notes)


def probe_image(source: ImageSource, *, max_pixels: int | None = None, name: str | None = None) -> tuple[int, int]:
    """(width, height) from the file's header alone, without decoding it: the cheap check of
    a file that is missing, not an image, or over the pixel limit (the same ImageErrors as
    `load_image_with_notes`; a damaged body is found only when the image is decoded)."""
    fp: Any = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    name = name or ("<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else os.fspath(source))
    with _pixel_limit(max_pixels) as limit, _read_errors(name, limit):
        with Image.open(fp) as img:
            return img.size


def tiny_image_note(size: tuple[int, int]) -> str | None:
    """A note for an image too small to show a model anything (it is still described)."""
    width, height = size
    if min(width, height) >= TINY_IMAGE_SIDE:
        return None
    return f"the image is only {width}x{height} pixels; scaled up to the model's input size, it holds little to see"


@contextmanager
def _read_errors(name: str, limit: int | None) -> Iterator[None]:
    """Pillow's exceptions while opening or decoding `name` -> one ImageError each."""
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"image '{name}' is larger than the limit of {limit} pixels (possible decompression bomb)",
            hint=f"if you trust the file, raise the limit with {MAX_PIXELS_OPTION} N or {MAX_PIXELS_ENV}=N",
            kind="too_large",
        ) from None
    except FileNotFoundError:
        raise ImageError(f"cannot read image '{name}': no such file", kind="missing") from None
    except IsADirectoryError:
        raise ImageError(f"cannot read image '{name}': it is a directory") from None
    except PermissionError:
        raise ImageError(f"cannot read image '{name}': permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(
            f"cannot read image '{name}': not an image, or a format Pillow cannot decode", kind="undecodable"
        ) from None
    # Decoders report damaged data with any of these (e.g. "image file is truncated",
    # SyntaxError "broken PNG file", struct errors from bad headers).
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        raise _damaged(name, e) from None


def _damaged(name: str, e: BaseException) -> ImageError:
    """Pillow's word for a damaged file, said once: "the file is truncated", not "image file is
    truncated (the file may be corrupt or truncated)"."""
    text = str(e)
    if "truncat" in text.lower():
        detail = re.search(r"\((\d+ bytes not processed)\)", text)
        return ImageError(
            f"cannot read image '{name}': the file is truncated" + (f" ({detail.group(1)})" if detail else ""),
            kind="undecodable",
        )
    return ImageError(f"cannot read image '{name}': {text}", hint="the file may be corrupt or truncated", kind="undecodable")


# Pillow's limit is a module global read deep inside its decoders, so a different limit can
# only be applied by swapping the global; the lock keeps our own concurrent loads consistent.
_PIXEL_LIMIT_LOCK = threading.Lock()


@contextmanager
def _pixel_limit(max_pixels: int | None) -> Iterator[int | None]:
    """Apply `max_pixels` (or Pillow's default) and make Pillow's bomb warning an error."""
    with _PIXEL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        if max_pixels is not None:
            Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield Image.MAX_IMAGE_PIXELS
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, the way a person would expect the picture to look."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _high_depth_to_l(img, notes)
    if img.mode == "CMYK":
        return _cmyk_to_rgb(img)
    # Same rule as transformers' convert_to_rgb, so our pixels match the reference's:
    # P/L/RGB with a transparent colour, and LA/PA/RGBA, go over an opaque white background.
    if "A" in img.getbands() or "transparency" in img.info:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def _high_depth_to_l(img: Image.Image, notes: list[str]) -> Image.Image:
    """16-bit / 32-bit greyscale -> 8-bit 'L'.

    Pillow's own convert('L') clips at 255, which turns almost every 16-bit image white.
    16-bit data (I;16*, and I holding 0..65535) and floats in [0, 1] scale by their nominal
    range; anything else has no nominal range, so its actual min..max is stretched.
    """
    sixteen_bit = img.mode.startswith("I;16")
    if img.mode != "F":
        img = img.convert("I")  # exact, and unlike I;16B etc. it supports getextrema
    lo, hi = img.getextrema()  # getextrema skips NaN
    if sixteen_bit or (img.mode == "I" and 0 <= lo and hi <= 65535):
        lo, hi = 0, 65535
    elif img.mode == "F" and 0 <= lo and hi <= 1:
        lo, hi = 0.0, 1.0
    else:
        notes.append(f"{img.mode} image with values {lo:g}..{hi:g} stretched to 8 bits")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("pixel values are not finite")
    scale = 255 / (hi - lo) if hi > lo else 0.0
    # F -> L conversion truncates and clips, so + 0.5 makes it round to nearest
    return img.convert("F").point(lambda v: (v - lo) * scale + 0.5).convert("L")


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    """Use the embedded ICC profile when there is one: print CMYK converted naively looks garish."""
    icc = img.info.get("icc_profile")
    if icc and ImageCms is not None:
        try:
            cmyk = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(img, cmyk, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (OSError, ImageCms.PyCMSError):
            pass  # a broken profile is no reason to refuse the picture
    return img.convert("RGB")  # (255 - C) * (255 - K) / 255, Pillow handles Adobe-inverted JPEGs


# --------------------------------------------------------------------------- preprocessing


def preprocess(image: Image.Image, cfg: ImageProcessorConfig) -> torch.Tensor:
    """One Pillow image -> float32 (3, H, W) pixel values, as transformers' processor computes them."""
    if image.mode != "RGB" or "transparency" in image.info:
        # The vision tower needs 3 channels whatever do_convert_rgb says; for an RGB image
        # transformers' conversion is a no-op, so results match either way.
        image = _to_rgb(image, [])
    if cfg.do_resize:
        height, width = _resize_size(image.height, image.width, cfg.size)
        # PIL returns a copy when the size is unchanged, like transformers, so always call it
        image = image.resize((width, height), resample=cfg.resample)

    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    x = x.view(image.height, image.width, 3).permute(2, 0, 1)
    if cfg.do_center_crop:
        x = _center_crop(x, *cfg.crop_size)  # on uint8, so padding is black like the reference

    if cfg.do_rescale:
        # the reference multiplies in float64 and rounds once to float32
        x = (x.to(torch.float64) * cfg.rescale_factor).to(torch.float32)
    else:
        x = x.to(torch.float32)
    if cfg.do_normalize:
        mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(cfg.image_std, dtype=torch.float32).view(3, 1, 1)
        x = (x - mean) / std  # a subtraction then a division, both in float32, as the reference
    return x.contiguous()


def preprocess_batch(images: Sequence[Image.Image], cfg: ImageProcessorConfig) -> torch.Tensor:
    """Several Pillow images -> float32 (N, 3, H, W)."""
    if not images:
        raise ValueError("preprocess_batch needs at least one image")
    tensors = [preprocess(img, cfg) for img in images]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise CheckpointError(
            "the image processor config does not give every image the same size, so they "
            f"cannot be batched (got {sorted(s[1:] for s in shapes)})"
        )
    return torch.stack(tensors)


def _resize_size(height: int, width: int, size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) after resizing; an int size is the shortest edge, aspect ratio kept."""
    if isinstance(size, tuple):
        return size
    # transformers' get_resize_output_image_size(default_to_square=False): the long edge is
    # truncated (int(), not round()) and computed exactly this way, so sizes agree
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def _center_crop(x: torch.Tensor, crop_h: int, crop_w: int) -> torch.Tensor:
    """Center crop of a (C, H, W) tensor, zero-padded first if it is smaller than the crop.

    For an odd margin the extra row/column is dropped from the bottom/right (the top offset
    rounds down), and padding puts its extra row/column at the top/left, as transformers does.
    """
    _, h, w = x.shape
    if h < crop_h or w < crop_w:
        pad_h, pad_w = max(crop_h - h, 0), max(crop_w - w, 0)
        top, left = (pad_h + 1) // 2, (pad_w + 1) // 2
        x = torch.nn.functional.pad(x, (left, pad_w - left, top, pad_h - top))
        _, h, w = x.shape
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return x[:, top : top + crop_h, left : left + crop_w]


# --------------------------------------------------------------------------- anyres


def anyres_views(
    image: Image.Image,
    cfg: ImageProcessorConfig,
    pinpoints: Sequence[tuple[int, int]] | None = None,
    *,
    base_only: bool = False,
) -> list[Image.Image]:
    """The views LLaVA-NeXT / OneVision encode for one image: the base view, then the tiles
    of its best grid row by row (uint8 RGB Pillow images, before `preprocess`).

    base_only (OneVision, several images in one prompt): only the image padded to a square
    with the mean colour."""
    if image.mode != "RGB" or "transparency" in image.info:
        image = _to_rgb(image, [])
    if base_only:
        return [_pad_to_square(image, tuple(int(m * 255) for m in cfg.image_mean))]
    pinpoints = pinpoints or cfg.image_grid_pinpoints
    if not pinpoints:
        raise CheckpointError("anyres preprocessing needs image_grid_pinpoints")
    tile = cfg.tile_size or (cfg.size[0] if isinstance(cfg.size, tuple) else cfg.size)
    size = (image.height, image.width)
    best_h, best_w = anyres.select_best_resolution(size, pinpoints)
    if best_h % tile or best_w % tile:
        raise CheckpointError(f"grid resolution {best_h}x{best_w} is not a whole number of {tile} px tiles")
    new_h, new_w = anyres.resized_size(size, (best_h, best_w))
    resized = image.resize((new_w, new_h), resample=cfg.resample)
    top, _, left, _ = anyres.padding((new_h, new_w), (best_h, best_w))
    canvas = Image.new("RGB", (best_w, best_h), (0, 0, 0))
    canvas.paste(resized, (left, top))
    tiles = [
        canvas.crop((x, y, x + tile, y + tile)) for y in range(0, best_h, tile) for x in range(0, best_w, tile)
    ]
    base_h, base_w = cfg.size if isinstance(cfg.size, tuple) else (cfg.size, cfg.size)
    base = image.resize((base_w, base_h), resample=cfg.resample)
    return [base] + tiles


def preprocess_anyres(
    image: Image.Image,
    cfg: ImageProcessorConfig,
    pinpoints: Sequence[tuple[int, int]] | None = None,
    *,
    base_only: bool = False,
) -> torch.Tensor:
    """One image -> float32 (views, 3, H, W): the base view, then the tiles (see anyres_views)."""
    return torch.stack([preprocess(view, cfg) for view in anyres_views(image, cfg, pinpoints, base_only=base_only)])


def _pad_to_square(image: Image.Image, colour: tuple[int, ...]) -> Image.Image:
    """The image centred on a square of `colour` (OneVision's pad_to_square)."""
    side = max(image.width, image.height)
    if image.width == image.height:
        return image
    canvas = Image.new("RGB", (side, side), colour)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas
