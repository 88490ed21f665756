"""LLaVA's processor: one view per image (CLIP: shortest edge + center crop; SigLIP: a
plain resize), or for NeXT / OneVision a base view and the tiles of the best grid; the
chat template writes one <image> per image, expanded to that image's token count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmcli.config import MultiModalConfig
from vlmcli.errors import CheckpointError
from vlmcli.preprocess import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, preprocess_anyres, preprocess_batch
from vlmcli.processor import Notice, PreparedImages, image_settings
from vlmcli.sequence import Message, PromptSequence, build_sequence
from vlmcli.tokenizer import Tokenizer


def image_processor_defaults(cfg: MultiModalConfig) -> dict[str, Any]:
    """A preprocessor_config.json for a checkpoint that has none: what the vision tower
    was trained with (CLIP: shortest edge + center crop; SigLIP: a plain resize)."""
    size = cfg.vision.image_size
    if cfg.vision.model_type == "siglip_vision_model":
        recipe: dict[str, Any] = {
            "size": {"height": size, "width": size},
            "do_center_crop": False,
            "image_mean": list(SIGLIP_MEAN),
            "image_std": list(SIGLIP_STD),
        }
    else:
        recipe = {
            "size": {"shortest_edge": size},
            "crop_size": {"height": size, "width": size},
            "do_center_crop": True,
            "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD),
        }
    if cfg.anyres is not None:
        recipe["image_grid_pinpoints"] = [list(p) for p in cfg.anyres.grid_pinpoints]
    return recipe


class LlavaProcessor:
    def __init__(self, cfg: MultiModalConfig, folder: Path, tokenizer: Tokenizer, family_name: str, notice: Notice | None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.image_config, _ = image_settings(folder, image_processor_defaults(cfg), family_name, notice)
        anyres = cfg.anyres
        pinpoints = self.image_config.image_grid_pinpoints
        if anyres is not None and pinpoints not in (None, anyres.grid_pinpoints):
            # transformers would tile with one grid and unpack with the other, and fail
            raise CheckpointError(
                "the image processor settings and config.json disagree on image_grid_pinpoints",
                hint="the checkpoint is inconsistent; re-download it",
            )

    def prepare_images(self, images: list[Image.Image]) -> PreparedImages:
        sizes = [(img.height, img.width) for img in images]
        counts = [self.cfg.image_tokens(h, w, len(images)) for h, w in sizes]
        anyres = self.cfg.anyres
        if anyres is None:
            pixels = preprocess_batch(images, self.image_config)
            views = [1] * len(images)
        else:
            base_only = anyres.base_only_when_several and len(images) > 1
            per_image = [
                preprocess_anyres(img, self.image_config, anyres.grid_pinpoints, base_only=base_only)
                for img in images
            ]
            pixels = torch.cat(per_image)
            views = [p.shape[0] for p in per_image]
        return PreparedImages(pixels, sizes, views, counts)

    def build_prompt(self, messages: list[Message], token_counts: list[int], context_length: int) -> PromptSequence:
        return build_sequence(
            self.tokenizer,
            messages,
            image_token_id=self.cfg.image_token_id,
            tokens_per_image=token_counts,
            context_length=context_length,
        )
