"""Train the bundled demo model (`vlm ... -m demo`) from nothing, on the CPU.

    python -m training.train_demo                      # writes vlmcli/demo_model/
    python -m training.train_demo --out /tmp/demo --threads 2

A LLaVA in miniature, built from the same vlmcli.model modules inference runs (CLIP-style
ViT -> 2-layer GELU projector -> LLaMA decoder), trained in the four stages of the LLaVA
recipe on synthetic scenes (training/shapes.py):

  1. vision:      the ViT learns, for every patch, the colour and kind of the shape covering
                  it, and for the whole image which (colour, shape) pairs are present and
                  how many shapes there are. The small heads doing so are thrown away.
  2. language:    the decoder alone is a language model over the chat-formatted captions and
                  answers; half of its texts carry the scene as words before the question,
                  so it also learns to read answers out of its context.
  3. alignment:   vision and decoder frozen, only the projector learns, on captions.
  4. instruction: vision frozen; projector and decoder learn captions and questions in
                  multi-turn conversations about one image (every turn is supervised).

Everything is seeded (Python's and torch's generators, one seed per stage), so a rerun on
the same machine and library versions gives the same weights. The checkpoint is the
Hugging Face llava layout (llava-hf tensor names, float32 safetensors), written to a
temporary folder next to the destination and swapped in at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import string
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # `python training/train_demo.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import shapes  # noqa: E402
from vlmcli.checkpoint import demo_path  # noqa: E402
from vlmcli.config import MultiModalConfig  # noqa: E402
from vlmcli.families.llava.templates import LLAVA_DEFAULT_CHAT_TEMPLATE  # noqa: E402
from vlmcli.model.multimodal import VisionLanguageModel  # noqa: E402
from vlmcli.preprocess import ImageProcessorConfig, preprocess  # noqa: E402
from vlmcli.sequence import assistant_message, user_message  # noqa: E402
from vlmcli.tokenizer import Tokenizer  # noqa: E402

SEED = 20240607
IMAGE_SIZE, PATCH_SIZE = 64, 8
GRID = IMAGE_SIZE // PATCH_SIZE
MEAN = STD = (0.5, 0.5, 0.5)
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")  # ids 0..4
UNK, BOS, EOS, PAD, IMAGE = range(5)

VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=512)

# Rendering of training images: any resolution in this range (the preprocessor resizes to
# 64 px), shape colours jittered, a share of them JPEG-compressed.
TRAIN_RESOLUTIONS = (40, 320)
COLOUR_JITTER = 14
JPEG_SHARE, JPEG_QUALITY = 0.35, (35, 95)
NBR_LAYER = 2  # stage 1 predicts each patch's neighbourhood from this block's output
CAPTION_FIRST = 0.5  # share of stage-4 conversations that open with the caption request
SUB = 4  # each patch's shape mask is predicted on SUB x SUB sub-cells in stage 1


@dataclass
class Budget:
    """Steps per stage (batch sizes are fixed). --scale multiplies them for quick trials."""

    images: int = 20000
    vision_steps: int = 1800
    vision_batch: int = 64
    vision_lr: float = 5e-3
    text_steps: int = 250
    text_batch: int = 64
    align_steps: int = 150
    align_batch: int = 32
    instruct_steps: int = 2000
    instruct_batch: int = 32
    instruct_lr: float = 1.5e-3

    def scaled(self, k: float) -> "Budget":
        return Budget(
            images=max(256, int(self.images * k)),
            vision_steps=max(2, int(self.vision_steps * k)),
            vision_batch=self.vision_batch,
            vision_lr=self.vision_lr,
            text_steps=max(2, int(self.text_steps * k)),
            text_batch=self.text_batch,
            align_steps=max(2, int(self.align_steps * k)),
            align_batch=self.align_batch,
            instruct_steps=max(2, int(self.instruct_steps * k)),
            instruct_batch=self.instruct_batch,
            instruct_lr=self.instruct_lr,
        )


# ---- configuration files ------------------------------------------------------------------


def hf_config(vocab_size: int) -> dict:
    """config.json as transformers' LlavaConfig writes it (only non-default keys, and those
    a reader needs)."""
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": IMAGE,
        "image_seq_length": GRID * GRID,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        "dtype": "float32",
        "transformers_version": "5.24.0",
        "vision_config": {
            "model_type": "clip_vision_model",
            **VISION,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "num_channels": 3,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": VISION["hidden_size"],
        },
        "text_config": {
            "model_type": "llama",
            **TEXT,
            "vocab_size": vocab_size,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": BOS,
            "eos_token_id": EOS,
            "pad_token_id": PAD,
        },
    }


def preprocessor_config() -> dict:
    return {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "LlavaProcessor",
        "do_resize": True,
        "size": {"shortest_edge": IMAGE_SIZE},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(MEAN),
        "image_std": list(STD),
        "do_convert_rgb": True,
    }


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "processor_class": "LlavaProcessor",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "extra_special_tokens": {"image_token": "<image>"},
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": TEXT["max_position_embeddings"],
        "padding_side": "left",
    }


def processor_config() -> dict:
    # What LlavaProcessor needs to expand one <image> into the model's 64 slots.
    return {
        "processor_class": "LlavaProcessor",
        "image_token": "<image>",
        "patch_size": PATCH_SIZE,
        "num_additional_image_tokens": 1,
        "vision_feature_select_strategy": "default",
    }


def generation_config() -> dict:
    return {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, "max_new_tokens": 48,
            "do_sample": False, "transformers_version": "5.24.0"}


# ---- tokenizer ----------------------------------------------------------------------------


def build_tokenizer(seed: int):
    """A small lower-casing BPE (Metaspace, punctuation split off) trained on the domain's
    chat text. Every ASCII letter, digit and punctuation mark is in the alphabet, so any
    English prompt encodes without <unk>; the domain's words are single tokens."""
    from tokenizers import Regex, Tokenizer as Backend, decoders, models, normalizers, pre_tokenizers, processors, trainers

    rng = random.Random(seed)
    lines = []
    for _ in range(4000):
        scene = shapes.sample_scene(rng)
        lines.append(f"USER: {rng.choice(shapes.DESCRIBE_PROMPTS)} ASSISTANT: {shapes.caption(scene)}")
        for qa in shapes.questions(scene, rng):
            lines.append(f"USER: {qa.question} ASSISTANT: {qa.answer}")
    tok = Backend(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
         pre_tokenizers.Punctuation("isolated")]
    )
    alphabet = list(string.ascii_lowercase + string.digits + string.punctuation)
    trainer = trainers.BpeTrainer(
        vocab_size=224, special_tokens=list(SPECIALS), initial_alphabet=alphabet, min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    for i, name in enumerate(SPECIALS):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    words = {w for line in lines for w in line.lower().replace("?", " ").replace(".", " ").replace(",", " ").split()}
    for w in words - {"user:", "assistant:"}:
        assert len(tok.encode(w, add_special_tokens=False).ids) == 1, f"domain word {w!r} is split"
    return tok


def write_tokenizer_files(tok, folder: Path) -> Tokenizer:
    tok.save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", tokenizer_config())
    _write_json(folder / "chat_template.json", {"chat_template": LLAVA_DEFAULT_CHAT_TEMPLATE})
    return Tokenizer.from_dir(folder)


# ---- sequences ----------------------------------------------------------------------------


class Sequencer:
    """Conversations -> (ids, loss mask) exactly as vlmcli.sequence builds prompts.

    Token pieces are cached (the first user turn with its <image>, each answer, each later
    user turn) and concatenated; `check` compares the result with the tokenizer's own chat
    encoding on random conversations before training starts."""

    def __init__(self, tokenizer: Tokenizer, n_visual: int):
        self.tok = tokenizer
        self.n_visual = n_visual
        self._first: dict[tuple[str, bool], list[int]] = {}
        self._answer: dict[str, list[int]] = {}
        self._later: dict[str, list[int]] = {}

    def first(self, prompt: str, image: bool) -> list[int]:
        key = (prompt, image)
        if key not in self._first:
            msg = user_message(prompt, 1) if image else {"role": "user", "content": prompt}
            ids = self.tok.encode_chat([msg], add_generation_prompt=True)
            if image:
                at = ids.index(IMAGE)
                ids = ids[:at] + [IMAGE] * self.n_visual + ids[at + 1 :]
            self._first[key] = ids
        return self._first[key]

    def answer(self, text: str) -> list[int]:
        if text not in self._answer:
            self._answer[text] = self.tok.encode(text) + [EOS]
        return self._answer[text]

    def later(self, prompt: str) -> list[int]:
        if prompt not in self._later:
            a, b = user_message("x", 0), assistant_message("y")
            base = self.tok.encode_chat([a, b], add_generation_prompt=False)
            full = self.tok.encode_chat([a, b, user_message(prompt, 0)], add_generation_prompt=True)
            assert full[: len(base)] == base
            self._later[prompt] = full[len(base) :]
        return self._later[prompt]

    def build(self, turns: list[tuple[str, str]], image: bool) -> tuple[list[int], list[bool]]:
        ids: list[int] = []
        mask: list[bool] = []
        for i, (prompt, answer) in enumerate(turns):
            head = self.first(prompt, image) if i == 0 else self.later(prompt)
            ans = self.answer(answer)
            ids += head + ans
            mask += [False] * len(head) + [True] * len(ans)
        return ids, mask

    def check(self, rng: random.Random, n: int = 200) -> None:
        for _ in range(n):
            scene = shapes.sample_scene(rng)
            turns = conversation(scene, rng, max_turns=5)
            image = rng.random() < 0.7
            ids, _ = self.build(turns, image)
            msgs = []
            for i, (q, a) in enumerate(turns):
                msgs.append(user_message(q, 1 if (i == 0 and image) else 0))
                msgs.append(assistant_message(a))
            if not image:
                msgs[0] = {"role": "user", "content": turns[0][0]}
            ref = self.tok.encode_chat(msgs, add_generation_prompt=False)
            if image:
                at = ref.index(IMAGE)
                ref = ref[:at] + [IMAGE] * self.n_visual + ref[at + 1 :]
            assert ids == ref, (turns, ids, ref)


def conversation(scene: shapes.Scene, rng: random.Random, max_turns: int,
                 p_caption_first: float = CAPTION_FIRST) -> list[tuple[str, str]]:
    """Up to max_turns (prompt, answer) turns about one scene, without repeats: the caption
    request first (with probability p_caption_first) or last, the scene's questions in
    random order. A decoder is causal, so every first turn is exactly a one-question
    prompt; questions asked before the caption must be answered from the image."""
    cap = (rng.choice(shapes.DESCRIBE_PROMPTS), shapes.caption(scene))
    qas = [(qa.question, qa.answer) for qa in shapes.questions(scene, rng)]
    rng.shuffle(qas)
    if rng.random() < p_caption_first:
        return ([cap] + qas)[:max_turns]
    return qas[: max_turns - 1] + [cap] if max_turns > 1 else qas[:1]


def collate(batch: list[tuple[list[int], list[bool]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and next-token targets (B, T) with -100 where nothing is learned."""
    T = max(len(ids) for ids, _ in batch)
    ids_t = torch.full((len(batch), T), PAD, dtype=torch.long)
    tgt = torch.full((len(batch), T), -100, dtype=torch.long)
    for b, (ids, mask) in enumerate(batch):
        ids_t[b, : len(ids)] = torch.tensor(ids)
        for t in range(len(ids) - 1):
            if mask[t + 1]:
                tgt[b, t] = ids[t + 1]
    return ids_t, tgt


# ---- image pool ---------------------------------------------------------------------------


@dataclass
class Pool:
    scenes: list[shapes.Scene]
    pixels: torch.Tensor  # uint8 (N, 3, 64, 64): the preprocessed image before normalisation
    patch_colour: torch.Tensor  # (N, GRID*GRID) 0 = background, 1 + colour index
    patch_kind: torch.Tensor  # (N, GRID*GRID) 0 = background, 1 + kind index
    presence: torch.Tensor  # (N, 24) float multi-hot over (colour, kind)
    count: torch.Tensor  # (N,) shapes - 1
    sub_mask: torch.Tensor  # (N, GRID*GRID, SUB*SUB) shape coverage of each patch's sub-cells

    def normalized(self, idx: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        # preprocess()'s arithmetic: rescale in float64, normalise in float32
        x = (self.pixels[idx].to(torch.float64) / 255).to(torch.float32)
        x = (x - 0.5) / 0.5
        if flip is not None:
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x


def render_training_image(scene: shapes.Scene, rng: random.Random):
    resolution = rng.randint(*TRAIN_RESOLUTIONS)
    quality = rng.randint(*JPEG_QUALITY) if rng.random() < JPEG_SHARE else None
    return shapes.render(scene, resolution, rng=rng, colour_jitter=COLOUR_JITTER, jpeg_quality=quality)


def make_pool(n: int, seed: int, image_cfg: ImageProcessorConfig) -> Pool:
    rng = random.Random(seed)
    scenes, pix, pc, pk, pres, cnt, sub = [], [], [], [], [], [], []
    pair_index = {(c, k): i for i, (c, k) in enumerate((c, k) for c in shapes.COLOUR_NAMES for k in shapes.KINDS)}
    for _ in range(n):
        scene = shapes.sample_scene(rng)
        x = preprocess(render_training_image(scene, rng), image_cfg)
        pix.append(torch.round((x * 0.5 + 0.5) * 255).to(torch.uint8))
        colours, kinds = shapes.patch_labels(scene, GRID)
        cov = torch.tensor(shapes.coverage_map(scene, GRID * SUB)).view(GRID, SUB, GRID, SUB)
        sub.append(cov.permute(0, 2, 1, 3).reshape(GRID * GRID, SUB * SUB))
        pc.append(colours)
        pk.append(kinds)
        p = torch.zeros(len(pair_index))
        for pair in scene.pairs:
            p[pair_index[pair]] = 1
        pres.append(p)
        cnt.append(len(scene.shapes) - 1)
        scenes.append(scene)
    return Pool(scenes, torch.stack(pix), torch.tensor(pc), torch.tensor(pk), torch.stack(pres), torch.tensor(cnt),
                torch.stack(sub))


def flip_patches(labels: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    grid = labels.view(-1, GRID, GRID)
    return torch.where(flip.view(-1, 1, 1), grid.flip(-1), grid).reshape(labels.shape)


def neighbourhood(sub: torch.Tensor) -> torch.Tensor:
    """(B, GRID*GRID, SUB*SUB) sub-cell coverage -> (B, GRID*GRID, 36): for each patch, the
    coverage of the 3x3 patches around it at 2x2 cells per patch (zero outside the image)."""
    B = sub.shape[0]
    full = sub.view(B, GRID, GRID, SUB, SUB).permute(0, 1, 3, 2, 4).reshape(B, 1, GRID * SUB, GRID * SUB)
    half = F.avg_pool2d(full, SUB // 2)  # 2 cells per patch side
    windows = F.unfold(F.pad(half, (2, 2, 2, 2)), kernel_size=6, stride=2)  # (B, 36, GRID*GRID)
    return windows.transpose(1, 2)


def flip_sub_mask(sub: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """(B, GRID*GRID, SUB*SUB) mirrored left-right where `flip`."""
    x = sub.view(-1, GRID, GRID, SUB, SUB)
    return torch.where(flip.view(-1, 1, 1, 1, 1), x.flip(2).flip(4), x).reshape(sub.shape)


# ---- model --------------------------------------------------------------------------------


def build_model(cfg: MultiModalConfig, seed: int) -> VisionLanguageModel:
    torch.manual_seed(seed)
    model = VisionLanguageModel(cfg)
    model.decoder.setup("cpu")
    n_vis, n_txt = cfg.vision.n_layers, cfg.text.n_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                std = 0.02
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    std /= math.sqrt(2 * n_txt)
                elif name.endswith(("out_proj.weight", "fc2.weight")):
                    std /= math.sqrt(2 * n_vis)
                p.normal_(0, std)
            elif name.endswith("bias"):
                p.zero_()
            elif "class_embedding" in name:
                p.normal_(0, 0.02)
            else:  # LayerNorm / RMSNorm scales
                p.fill_(1.0)
        if LOCAL_INIT:
            local_attention_init_(model.vision, GRID)
    return model


POS_CHANNELS = 32  # channels of the vision residual stream that start as pure position code
LOCAL_INIT = True
LOCAL_SHARPNESS = 1.5
# Heads of the first blocks start looking one patch left, right, up and down (row, column).
LOCAL_OFFSETS = ((0, -1), (0, 1), (-1, 0), (1, 0))
LOCAL_LAYERS = 2


def local_attention_init_(vision, grid: int) -> None:
    """Start the ViT as a small convolutional network, then let training change it.

    A ViT learns from scratch that nearby patches matter only after thousands of steps (its
    attention has no notion of distance); telling circles, squares and triangles apart needs
    exactly that. So (in the spirit of ConViT's locality init): the first POS_CHANNELS
    channels of the position table hold a 2-D sine-cosine code of the patch's row and
    column (and the patch embedding writes nothing there), and in the first LOCAL_LAYERS
    blocks head h's query is that code rotated by LOCAL_OFFSETS[h] while its key is the
    code itself, so the head attends to the patch at that offset. All of it stays trainable.
    """
    n_freq = POS_CHANNELS // 4
    omega = math.pi * torch.arange(1, n_freq + 1, dtype=torch.float32) / grid
    rows = torch.arange(grid, dtype=torch.float32).repeat_interleave(grid)
    cols = torch.arange(grid, dtype=torch.float32).repeat(grid)
    code = torch.cat([torch.sin(rows[:, None] * omega), torch.cos(rows[:, None] * omega),
                      torch.sin(cols[:, None] * omega), torch.cos(cols[:, None] * omega)], dim=1)
    emb = vision.embeddings
    offset = 1 if vision.cfg.class_token else 0
    emb.position_embedding.weight[offset:, :POS_CHANNELS] = code
    emb.position_embedding.weight[offset:, POS_CHANNELS:] *= 0.5
    emb.position_embedding.weight[:offset, :POS_CHANNELS] = 0
    emb.patch_embedding.weight[:POS_CHANNELS] = 0

    def rotation(dy: int, dx: int) -> torch.Tensor:
        """(P, P) matrix taking the code of (r, c) to the code of (r + dy, c + dx)."""
        m = torch.zeros(POS_CHANNELS, POS_CHANNELS)
        for axis, delta in ((0, dy), (1, dx)):
            base = axis * 2 * n_freq
            c, s_ = torch.cos(delta * omega), torch.sin(delta * omega)
            for j in range(n_freq):
                si, ci = base + j, base + n_freq + j
                # sin(a+b) = sin a cos b + cos a sin b; cos(a+b) = cos a cos b - sin a sin b
                m[si, si], m[si, ci] = c[j], s_[j]
                m[ci, ci], m[ci, si] = c[j], -s_[j]
        return m

    hd = vision.cfg.head_dim
    assert hd >= POS_CHANNELS
    for layer in list(vision.encoder.layers)[:LOCAL_LAYERS]:
        attn = layer.self_attn
        for h, (dy, dx) in enumerate(LOCAL_OFFSETS[: attn.n_heads]):
            rows_h = slice(h * hd, h * hd + POS_CHANNELS)
            attn.q_proj.weight[rows_h] = 0
            attn.k_proj.weight[rows_h] = 0
            attn.q_proj.weight[rows_h, :POS_CHANNELS] = LOCAL_SHARPNESS * rotation(dy, dx)
            attn.k_proj.weight[rows_h, :POS_CHANNELS] = LOCAL_SHARPNESS * torch.eye(POS_CHANNELS)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(params, lr: float, wd: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    other = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98))


def set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def lm_loss(model: VisionLanguageModel, ids: torch.Tensor, tgt: torch.Tensor, visual) -> torch.Tensor:
    embeds = model.embed(ids, visual)
    keep = tgt != -100
    # Logits only where a target is learned: the decoder's hidden states, then norm + head.
    T = embeds.shape[1]
    cos, sin = model.decoder.rope(0, T, embeds.dtype)
    x = embeds
    for block in model.decoder.layers:
        x = block(x, cos, sin, 0, None)
    logits = model.decoder.lm_head(model.decoder.norm(x[keep]))
    return F.cross_entropy(logits, tgt[keep])


class Log:
    def __init__(self, name: str, total: int, every: int = 100):
        self.name, self.total, self.every = name, total, every
        self.t0 = time.perf_counter()
        self.acc: dict[str, float] = {}
        self.n = 0

    def step(self, i: int, **values: float) -> None:
        for k, v in values.items():
            self.acc[k] = self.acc.get(k, 0.0) + v
        self.n += 1
        if (i + 1) % self.every == 0 or i + 1 == self.total:
            avg = " ".join(f"{k} {v / self.n:.4f}" for k, v in self.acc.items())
            print(f"  [{self.name}] step {i + 1}/{self.total}  {avg}  ({time.perf_counter() - self.t0:.0f} s)",
                  flush=True)
            self.acc, self.n = {}, 0


# ---- stages -------------------------------------------------------------------------------


def stage_vision(model: VisionLanguageModel, pool: Pool, budget: Budget, seed: int) -> None:
    """Per-patch colour and kind, per-image pairs present and count, from the features the
    projector will read (hidden state of vision_feature_layer, [CLS] dropped)."""
    d = model.cfg.vision.d_vision
    n_pairs = pool.presence.shape[1]
    heads = nn.ModuleDict({
        "colour": nn.Linear(d, 1 + len(shapes.COLOURS)),
        "kind": nn.Linear(d, 1 + len(shapes.KINDS)),
        "pairs": nn.Linear(d, n_pairs),  # per patch, max-pooled: "some patch is a red circle"
        "count": nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 3)),
        "mask": nn.Linear(d, SUB * SUB),
        "nbr": nn.Linear(d, 36),
    })
    params = list(model.vision.parameters()) + list(heads.parameters())
    opt = make_optimizer(params, 1e-3, 0.05)
    gen = torch.Generator().manual_seed(seed)
    log = Log("vision", budget.vision_steps)
    model.vision.train()
    for step in range(budget.vision_steps):
        set_lr(opt, cosine_lr(step, budget.vision_steps, budget.vision_lr, 100))
        idx = torch.randint(len(pool.scenes), (budget.vision_batch,), generator=gen)
        flip = torch.rand(budget.vision_batch, generator=gen) < 0.5
        early, feats = (h[:, 1:] for h in model.vision(pool.normalized(idx, flip), (NBR_LAYER, -1)))
        sub = flip_sub_mask(pool.sub_mask[idx], flip)
        pooled = feats.mean(1)
        l_colour = F.cross_entropy(heads["colour"](feats).flatten(0, 1), flip_patches(pool.patch_colour[idx], flip).flatten())
        l_kind = F.cross_entropy(heads["kind"](feats).flatten(0, 1), flip_patches(pool.patch_kind[idx], flip).flatten())
        pair_logits = heads["pairs"](feats).amax(1)
        l_pairs = F.binary_cross_entropy_with_logits(pair_logits, pool.presence[idx])
        l_count = F.cross_entropy(heads["count"](pooled), pool.count[idx])
        l_mask = F.binary_cross_entropy_with_logits(heads["mask"](feats), sub)
        l_nbr = F.binary_cross_entropy_with_logits(heads["nbr"](early), neighbourhood(sub))
        loss = l_colour + l_kind + 4 * l_pairs + l_count + 4 * l_mask + 4 * l_nbr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
        opt.step()
        with torch.no_grad():
            exact = ((pair_logits > 0).float() == pool.presence[idx]).all(1).float().mean().item()
            kinds = flip_patches(pool.patch_kind[idx], flip)
            on_shape = kinds > 0
            kind_acc = (heads["kind"](feats).argmax(-1)[on_shape] == kinds[on_shape]).float().mean().item()
        log.step(step, loss=loss.item(), mask=l_mask.item(), nbr=l_nbr.item(), colour=l_colour.item(), kind=l_kind.item(), kind_acc=kind_acc,
                 pairs_exact=exact, gnorm=gnorm)


def text_sample(scene: shapes.Scene, rng: random.Random) -> list[tuple[str, str]]:
    """Text-only turns: either the answer alone (the language of captions and answers), or
    the scene written out before the question (reading an answer from the context)."""
    if rng.random() < 0.5:
        return conversation(scene, rng, max_turns=1, p_caption_first=0.5)
    context = shapes.caption(scene) + "."
    turns = conversation(scene, rng, max_turns=3, p_caption_first=0.5)
    return [(context + " " + turns[0][0], turns[0][1])] + turns[1:]


def stage_text(model: VisionLanguageModel, seq: Sequencer, budget: Budget, seed: int) -> None:
    dec = model.decoder
    opt = make_optimizer(dec.parameters(), 1e-3, 0.05)
    rng = random.Random(seed)
    log = Log("language", budget.text_steps)
    for step in range(budget.text_steps):
        set_lr(opt, cosine_lr(step, budget.text_steps, 2e-3, 50))
        batch = []
        for _ in range(budget.text_batch):
            ids, mask = seq.build(text_sample(shapes.sample_scene(rng), rng), image=False)
            batch.append((ids, [True] * len(ids)))  # a language model: every token after <s>
        ids, tgt = collate(batch)
        loss = lm_loss(model, ids, tgt, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        log.step(step, loss=loss.item())


def multimodal_batch(pool: Pool, seq: Sequencer, rng: random.Random, gen: torch.Generator, size: int,
                     max_turns: int, captions_only: bool):
    idx = torch.randint(len(pool.scenes), (size,), generator=gen)
    flip = torch.rand(size, generator=gen) < 0.5
    batch = []
    for i in idx.tolist():
        scene = pool.scenes[i]
        if captions_only:
            turns = [(rng.choice(shapes.DESCRIBE_PROMPTS), shapes.caption(scene))]
        else:
            turns = conversation(scene, rng, max_turns)
        batch.append(seq.build(turns, image=True))
    ids, tgt = collate(batch)
    return ids, tgt, pool.normalized(idx, flip)


def stage_multimodal(model, pool, seq, *, name, steps, batch, lr, train_decoder, max_turns, captions_only, seed):
    model.vision.requires_grad_(False).eval()
    model.decoder.requires_grad_(train_decoder)
    model.projector.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, lr, 0.01)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    log = Log(name, steps)
    for step in range(steps):
        set_lr(opt, cosine_lr(step, steps, lr, 50))
        ids, tgt, pixels = multimodal_batch(pool, seq, rng, gen, batch, max_turns, captions_only)
        with torch.no_grad():
            feats = model.vision_features(pixels)
        loss = lm_loss(model, ids, tgt, model.projector(feats))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log.step(step, loss=loss.item())
    model.requires_grad_(False)


# ---- checkpoint ---------------------------------------------------------------------------


def hf_state_dict(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """Our parameter names -> llava-hf's (the layout of llava-hf/llava-1.5-7b-hf)."""
    out = {}
    for name, p in model.state_dict().items():
        if name.startswith("vision."):
            key = "vision_tower.vision_model." + name[len("vision."):]
        elif name.startswith("projector."):
            key = "multi_modal_projector." + name[len("projector."):]
        elif name == "decoder.lm_head.weight":
            key = "language_model.lm_head.weight"
        elif name.startswith("decoder."):
            key = "language_model.model." + name[len("decoder."):]
        else:
            raise KeyError(name)
        out[key] = p.detach().to(torch.float32).contiguous().clone()
    # CLIP's final LayerNorm only feeds the pooled output, which LLaVA never reads; store an
    # identity one so every tensor a CLIPVisionModel has is present.
    d = model.cfg.vision.d_vision
    out["vision_tower.vision_model.post_layernorm.weight"] = torch.ones(d)
    out["vision_tower.vision_model.post_layernorm.bias"] = torch.zeros(d)
    return out


def write_checkpoint(model: VisionLanguageModel, tok, config: dict, out: Path, info: dict) -> None:
    """Write every file into a temporary sibling folder, then swap it into place."""
    from safetensors.torch import save_file

    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", config)
        write_tokenizer_files(tok, tmp)
        _write_json(tmp / "preprocessor_config.json", preprocessor_config())
        _write_json(tmp / "processor_config.json", processor_config())
        _write_json(tmp / "generation_config.json", generation_config())
        _write_json(tmp / "training_info.json", info)
        tmp.chmod(0o755)  # mkdtemp makes it private
        for f in tmp.iterdir():
            f.chmod(0o644)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}-old-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=demo_path(), help="checkpoint folder (default: the bundled demo)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (quick trials)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--reuse-vision", type=Path, default=None,
                    help="development: save stage 1's vision weights here, or load them if the file exists")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    budget = Budget().scaled(args.scale)
    seed = args.seed
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    tok = build_tokenizer(seed)
    with tempfile.TemporaryDirectory() as d:
        tokenizer = write_tokenizer_files(tok, Path(d))  # the files inference will read
    config = hf_config(tok.get_vocab_size())
    cfg = MultiModalConfig.from_hf(config)  # the parser every checkpoint goes through
    model = build_model(cfg, seed)
    seq = Sequencer(tokenizer, cfg.max_visual_tokens())
    seq.check(random.Random(seed + 1))
    image_cfg = ImageProcessorConfig.from_dict(preprocessor_config())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {tok.get_vocab_size()}, parameters {n_params:,} "
          f"(vision {sum(p.numel() for p in model.vision.parameters()):,}, "
          f"projector {sum(p.numel() for p in model.projector.parameters()):,}, "
          f"decoder {sum(p.numel() for p in model.decoder.parameters()):,})", flush=True)
    pool = make_pool(budget.images, seed + 2, image_cfg)
    times["data"] = time.perf_counter() - t0
    print(f"data: {budget.images} training images rendered ({times['data']:.0f} s)", flush=True)

    t0 = time.perf_counter()
    if args.reuse_vision and args.reuse_vision.exists():
        print(f"stage 1: vision encoder taken from {args.reuse_vision} (--reuse-vision)", flush=True)
        model.vision.load_state_dict(torch.load(args.reuse_vision))
    else:
        print("stage 1: vision encoder", flush=True)
        stage_vision(model, pool, budget, seed + 3)
        if args.reuse_vision:
            torch.save(model.vision.state_dict(), args.reuse_vision)
    times["1_vision"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    print("stage 2: decoder as a language model", flush=True)
    stage_text(model, seq, budget, seed + 4)
    times["2_language"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    print("stage 3: projector alignment (vision and decoder frozen)", flush=True)
    stage_multimodal(model, pool, seq, name="align", steps=budget.align_steps, batch=budget.align_batch,
                     lr=2e-3, train_decoder=False, max_turns=1, captions_only=True, seed=seed + 5)
    times["3_alignment"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    print("stage 4: instruction tuning (vision frozen; projector and decoder trained)", flush=True)
    stage_multimodal(model, pool, seq, name="instruct", steps=budget.instruct_steps, batch=budget.instruct_batch,
                     lr=budget.instruct_lr, train_decoder=True, max_turns=5, captions_only=False, seed=seed + 6)
    times["4_instruction"] = time.perf_counter() - t0

    times["total"] = time.perf_counter() - t_all
    info = {
        "trained_by": "training/train_demo.py",
        "seed": seed,
        "threads": args.threads,
        "budget": budget.__dict__,
        "parameters": n_params,
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "torch": torch.__version__,
    }
    model.eval()
    write_checkpoint(model, tok, config, args.out, info)
    print("times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()), flush=True)
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
