"""Qwen-VL's processor: the published image transform and prompt formats.

Images (visual.py's image_transform): resize to 448 x 448 (bicubic, Pillow, aspect ratio not
kept), ToTensor (/ 255), normalise with CLIP's mean and std. One view, 256 visual tokens.

Prompts. A message's content is written as tokenization_qwen.py's from_list_format does,
"Picture k: <img>PATH</img>\\n" for the k-th image of the message, then its text. The
published tokenizer fills the span between <img> and </img> with the path's bytes padded by
<imgpad> to 256 ids, and the model reads the path back from the ids; vlm never does: the span
is 256 <imgpad> slots that the visual tokens fill.
    Qwen-VL-Chat (generation_config.json chat_format "chatml", the default): make_context's
        ChatML, a system turn ("You are a helpful assistant." unless the messages open with a
        system message), each turn <|im_start|>role\\ncontent<|im_end|> joined by "\\n", then
        "\\n<|im_start|>assistant\\n". Role, newline and content are encoded apart, as there.
    Qwen-VL (chat_format "raw"): the user contents alone, as `tokenizer(query)` there.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from vlmcli import checkpoint
from vlmcli.errors import CheckpointError, ContextLengthError, VlmError
from vlmcli.families.qwen_vl.config import QwenVLConfig
from vlmcli.families.qwen_vl.tokenizer import IM_END, IM_START
from vlmcli.preprocess import BICUBIC, CLIP_MEAN, CLIP_STD, ImageProcessorConfig, preprocess
from vlmcli.processor import Notice, PreparedImages
from vlmcli.sequence import Message, PromptSequence, count_images
from vlmcli.tokenizer import Tokenizer

FAMILY_NAME = "Qwen-VL"
DEFAULT_SYSTEM = "You are a helpful assistant."

_Segment = str | None  # text, or None for one image span


def chat_format(folder: Path) -> str:
    """generation_config.json's chat_format: chatml (Qwen-VL-Chat) or raw (Qwen-VL)."""
    path = folder / "generation_config.json"
    fmt = checkpoint.read_json(path).get("chat_format", "chatml") if path.exists() else "chatml"
    if fmt not in ("chatml", "raw"):
        raise CheckpointError(f"generation_config.json: chat_format '{fmt}' is not supported (supported: chatml, raw)")
    return fmt


class QwenVLProcessor:
    def __init__(self, cfg: QwenVLConfig, folder: Path, tokenizer: Tokenizer, notice: Notice | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        side = cfg.vision.image_size
        # the transform is fixed in visual.py (the checkpoints ship no preprocessor config)
        self.image_config = ImageProcessorConfig(
            size=(side, side), resample=BICUBIC, do_center_crop=False, crop_size=(side, side),
            image_mean=CLIP_MEAN, image_std=CLIP_STD,
        )
        self.format = chat_format(folder)
        ids = {t: tokenizer.token_to_id(t) for t in ("<img>", "</img>", "<imgpad>", IM_START, IM_END)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise CheckpointError(f"the tokenizer has no {', '.join(missing)} token, which Qwen-VL prompts need")
        if ids["<imgpad>"] != cfg.image_token_id:
            raise CheckpointError(
                f"the tokenizer's <imgpad> is id {ids['<imgpad>']} but config.json's image_start_id "
                f"implies {cfg.image_token_id}"
            )
        self.ids = ids

    # ---- images

    def prepare_images(self, images: list[Image.Image]) -> PreparedImages:
        n = self.cfg.tokens_per_view()
        pixels = torch.stack([preprocess(img, self.image_config) for img in images])
        return PreparedImages(pixels, [(img.height, img.width) for img in images], [1] * len(images), [n] * len(images))

    # ---- prompt

    def _content(self, content) -> list[_Segment]:
        """from_list_format: images numbered within the message, then the text parts."""
        if isinstance(content, str):
            return [content]
        out: list[_Segment] = []
        k = 0
        for part in content:
            if part.get("type") == "image":
                k += 1
                out += [f"Picture {k}: ", None, "\n"]
            elif part.get("type") == "text":
                out.append(part.get("text", ""))
        return out

    def build_prompt(self, messages: list[Message], token_counts: list[int], context_length: int) -> PromptSequence:
        n_images = count_images(messages)
        if len(token_counts) != n_images:
            raise VlmError(f"{len(token_counts)} image token counts for {n_images} images")
        counts = iter(token_counts)
        enc = self.tokenizer.encode
        img = [self.ids["<img>"]], [self.ids["</img>"]]

        def content_ids(content) -> list[int]:
            """Text runs encoded whole (adjacent texts joined, as one string there), each
            image as <img>, its count of <imgpad>, </img>."""
            ids: list[int] = []
            text = ""
            for seg in self._content(content):
                if seg is not None:
                    text += seg
                    continue
                if text:
                    ids += enc(text)
                    text = ""
                ids += img[0] + [self.cfg.image_token_id] * next(counts) + img[1]
            return ids + (enc(text) if text else [])

        turns = list(messages)
        if self.format == "raw":
            ids = [i for m in turns if m.get("role") == "user" for i in content_ids(m.get("content", ""))]
        else:
            start, end, nl = [self.ids[IM_START]], [self.ids[IM_END]], enc("\n")
            system = DEFAULT_SYSTEM
            if turns and turns[0].get("role") == "system":
                first = turns.pop(0).get("content", "")
                if not isinstance(first, str):
                    first = "".join(p.get("text", "") for p in first if p.get("type") == "text")
                system = first
            ids = start + enc("system") + nl + enc(system) + end
            for m in turns:
                ids += nl + start + enc(m.get("role", "user")) + nl + content_ids(m.get("content", "")) + end
            ids += nl + start + enc("assistant") + nl
        image_tokens = ids.count(self.cfg.image_token_id)
        if image_tokens != sum(token_counts):
            raise VlmError(f"the prompt holds {image_tokens} image slots for {sum(token_counts)} visual tokens")
        if len(ids) >= context_length:
            raise ContextLengthError(
                f"the prompt is {len(ids)} tokens ({image_tokens} of them for "
                f"{n_images} image(s)) but the model's context is {context_length} tokens"
            )
        return PromptSequence(ids=ids, image_tokens=image_tokens, n_images=n_images)
