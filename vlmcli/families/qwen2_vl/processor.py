"""Qwen2-VL's processor: Qwen2VLImageProcessor's resize and patches, Qwen2VLProcessor's
prompt, and the 3-D RoPE positions of transformers' get_rope_index.

Images (native resolution):
    smart_resize: each side rounded to a multiple of 28 (patch 14 x merge 2), then scaled
    (aspect kept) into [min_pixels, max_pixels]; Pillow's bicubic resize on the uint8 image,
    rescale and normalise (CLIP statistics); cut into 14 px patches in 2x2 blocks, each
    patch repeated over 2 frames (temporal_patch_size) and flattened (C, T, 14, 14).
    An image of h x w patches becomes h * w / 4 visual tokens.
Prompt: the chat template writes <|vision_start|><|image_pad|><|vision_end|> per image;
    <|image_pad|> becomes that image's count.
Positions (3, T): text 0, 1, 2 ... on all three streams; an image's tokens at
    (start, start + row, start + column); text after it continues from start + max(rows,
    columns). Decoding continues at slot + (max position + 1 - prompt length).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmcli.errors import CheckpointError, ContextLengthError, UsageError, VlmError
from vlmcli.families.qwen2_vl.config import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, Qwen2VLConfig
from vlmcli.preprocess import BICUBIC, ImageProcessorConfig, _to_rgb, preprocess
from vlmcli.processor import Notice, PreparedImages, image_settings
from vlmcli.sequence import Message, PromptSequence, count_images
from vlmcli.tokenizer import Tokenizer

FAMILY_NAME = "Qwen2-VL"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# a note on stderr past this many visual tokens for one image
LARGE_IMAGE_TOKENS = 1024


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """transformers' smart_resize, step for step."""
    if max(height, width) / min(height, width) > 200:
        raise UsageError(
            f"the image is {width}x{height}: Qwen2-VL takes aspect ratios up to 200, not "
            f"{max(height, width) / min(height, width):.0f}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_processor_defaults(cfg: Qwen2VLConfig) -> dict[str, Any]:
    """The hub repos' preprocessor_config.json."""
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "resample": BICUBIC, "rescale_factor": 1 / 255,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "min_pixels": DEFAULT_MIN_PIXELS, "max_pixels": DEFAULT_MAX_PIXELS,
        "patch_size": cfg.vision.patch_size, "temporal_patch_size": cfg.vision.temporal_patch_size,
        "merge_size": cfg.vision.spatial_merge_size,
    }


def _positive_int(raw: dict[str, Any], key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"image processor {key} must be a positive integer, got {value!r}")
    return value


def patchify(x: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """(C, H, W) -> (H/p * W/p, C * temporal * p * p), as Qwen2VLImageProcessor.patchify."""
    C, H, W = x.shape
    gh, gw = H // patch, W // patch
    x = x.reshape(C, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
    x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, temporal, -1, -1)
    return x.reshape(gh * gw, C * temporal * patch * patch)


def rope_positions(ids: list[int], image_id: int, grids: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(3, len(ids)) positions, as transformers' Qwen2VLModel.get_rope_index."""
    out: list[torch.Tensor] = []
    pos = 0
    k = 0
    i = 0
    n = len(ids)
    while i < n:
        j = i
        is_image = ids[i] == image_id
        while j < n and (ids[j] == image_id) == is_image:
            j += 1
        if not is_image:
            out.append(torch.arange(j - i).view(1, -1).expand(3, -1) + pos)
            pos += j - i
        else:
            if k >= len(grids):
                raise VlmError(f"more image runs in the prompt than the {len(grids)} image grids")
            t, h, w = grids[k]
            k += 1
            lh, lw = h // merge, w // merge
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(lh) + pos, torch.arange(lw) + pos, indexing="ij")
            grid = torch.stack([tt, hh, ww]).reshape(3, -1)
            grid[0] += pos
            if grid.shape[1] != j - i:
                raise VlmError(f"an image of {grid.shape[1]} tokens has {j - i} placeholders")
            out.append(grid)
            pos += max(h, w) // merge
        i = j
    return torch.cat(out, dim=1) if out else torch.zeros(3, 0, dtype=torch.long)


class Qwen2VLProcessor:
    def __init__(self, cfg: Qwen2VLConfig, folder: Path, tokenizer: Tokenizer, notice: Notice | None = None,
                 family_name: str = FAMILY_NAME):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.notice = notice
        self.family_name = family_name  # Qwen2-VL, or Qwen2.5-VL (the same processor)
        defaults = image_processor_defaults(cfg)
        _, raw = image_settings(folder, defaults, family_name, notice)
        raw = {k: v for k, v in raw.items() if v is not None}
        size = raw.get("size") if isinstance(raw.get("size"), dict) else {}
        # Qwen2VLImageProcessor.__init__: min_pixels / max_pixels override size's edges
        min_pixels = raw.get("min_pixels", size.get("shortest_edge", size.get("min_pixels", DEFAULT_MIN_PIXELS)))
        max_pixels = raw.get("max_pixels", size.get("longest_edge", size.get("max_pixels", DEFAULT_MAX_PIXELS)))
        self.min_pixels = _positive_int(raw, "min_pixels", min_pixels)
        self.max_pixels = _positive_int(raw, "max_pixels", max_pixels)
        self.patch = _positive_int(raw, "patch_size", raw.get("patch_size", cfg.vision.patch_size))
        self.temporal = _positive_int(raw, "temporal_patch_size", raw.get("temporal_patch_size", cfg.vision.temporal_patch_size))
        self.merge = _positive_int(raw, "merge_size", raw.get("merge_size", cfg.vision.spatial_merge_size))
        v = cfg.vision
        if (self.patch, self.temporal, self.merge) != (v.patch_size, v.temporal_patch_size, v.spatial_merge_size):
            raise CheckpointError(
                f"the image processor's patches ({self.patch} px, {self.temporal} frames, merge {self.merge}) are "
                f"not the vision tower's ({v.patch_size} px, {v.temporal_patch_size} frames, merge {v.spatial_merge_size})",
                hint="the checkpoint is inconsistent; re-download it",
            )
        plain = {k: raw[k] for k in ("do_rescale", "do_normalize", "do_convert_rgb", "rescale_factor", "image_mean",
                                     "image_std", "resample", "image_processor_type") if k in raw}
        plain.setdefault("image_mean", list(CLIP_MEAN))
        plain.setdefault("image_std", list(CLIP_STD))
        config = ImageProcessorConfig.from_dict(plain)
        self.do_resize = bool(raw.get("do_resize", True))
        self.image_config = config
        self._view_config = dataclasses.replace(config, do_resize=False, do_center_crop=False)
        self.vision_start_id = cfg.vision_start_token_id
        self.vision_end_id = cfg.vision_end_token_id

    def set_pixels(self, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
        """The pixel budget of one image (Qwen2VLImageProcessor's min_pixels / max_pixels)."""
        for name, value in (("--min-pixels", min_pixels), ("--max-pixels", max_pixels)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"{name} must be a positive integer, not {value!r}")
        lo = self.min_pixels if min_pixels is None else min_pixels
        hi = self.max_pixels if max_pixels is None else max_pixels
        if lo > hi:
            low = f"--min-pixels {lo}" if min_pixels is not None else f"the model's min_pixels {lo}"
            high = f"--max-pixels {hi}" if max_pixels is not None else f"the model's max_pixels {hi}"
            raise UsageError(f"{low} is more than {high}")
        self.min_pixels, self.max_pixels = lo, hi

    # ---- images

    def resized(self, image: Image.Image) -> Image.Image:
        if image.mode != "RGB" or "transparency" in image.info:
            image = _to_rgb(image, [])
        if not self.do_resize:
            return image
        h, w = smart_resize(image.height, image.width, self.patch * self.merge, self.min_pixels, self.max_pixels)
        return image.resize((w, h), resample=self.image_config.resample)

    def prepare_images(self, images: list[Image.Image]) -> PreparedImages:
        patches, grids, counts = [], [], []
        for image in images:
            x = preprocess(self.resized(image), self._view_config)  # (3, H, W) float32
            _, H, W = x.shape
            step = self.patch * self.merge
            if H % step or W % step:
                raise CheckpointError(f"a {W}x{H} image does not cut into {step} px blocks (do_resize is off)")
            patches.append(patchify(x, self.patch, self.merge, self.temporal))
            gh, gw = H // self.patch, W // self.patch
            grids.append((1, gh, gw))
            counts.append(gh * gw // self.merge**2)
            if counts[-1] > LARGE_IMAGE_TOKENS and self.notice:
                self.notice(
                    f"a {image.width}x{image.height} image becomes {counts[-1]} visual tokens ({W}x{H} px); "
                    f"--max-pixels lowers that (now {self.max_pixels})"
                )
        return PreparedImages(
            torch.cat(patches) if len(patches) > 1 else patches[0],
            [(img.height, img.width) for img in images],
            [1] * len(images),
            counts,
            grids=grids,
        )

    # ---- prompt

    def build_prompt(self, messages: list[Message], token_counts: list[int], context_length: int,
                     grids: list[tuple[int, int, int]] | None = None) -> PromptSequence:
        n_images = count_images(messages)
        counts = list(token_counts)
        if len(counts) != n_images:
            raise VlmError(f"{len(counts)} image token counts for {n_images} images")
        if n_images and (grids is None or len(grids) != n_images):
            raise VlmError(f"{self.family_name} prompts need the patch grid of each of the {n_images} images")
        image_id = self.cfg.image_token_id
        ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        if ids.count(image_id) != n_images:
            raise VlmError(
                f"the chat template wrote {ids.count(image_id)} image placeholders for {n_images} images; "
                f"the model's template does not place images where vlm expects them"
            )
        out: list[int] = []
        k = 0
        for i in ids:
            if i == image_id:
                out += [image_id] * counts[k]
                k += 1
            else:
                out.append(i)
        image_tokens = sum(counts)
        if len(out) >= context_length:
            raise ContextLengthError(
                f"the prompt is {len(out)} tokens ({image_tokens} of them for "
                f"{n_images} image(s)) but the model's context is {context_length} tokens",
                hint="--max-pixels makes images fewer tokens",
            )
        positions = rope_positions(out, image_id, list(grids or []), self.merge)
        return PromptSequence(ids=out, image_tokens=image_tokens, n_images=n_images, positions=positions)
