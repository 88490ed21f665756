"""Qwen-VL's config.json (Qwen/Qwen-VL, Qwen/Qwen-VL-Chat: the remote-code `qwen` layout).

    top level   the QWen decoder: hidden_size, num_hidden_layers, num_attention_heads,
                kv_channels (head_dim), intermediate_size (twice the SwiGLU width: w1 and w2
                are intermediate_size // 2 each), layer_norm_epsilon (RMSNorm),
                rotary_emb_base, rotary_pct, seq_length, use_dynamic_ntk, use_logn_attn,
                no_bias (c_attn always has a bias), vocab_size, tie_word_embeddings
    visual      the ViT-bigG tower and its resampler: image_size 448, patch_size 14, width
                1664, layers 48, heads 16, mlp_ratio 4.9231, output_dim 4096 (the resampler's
                and the decoder's width), image_start_id (<img>), n_queries (256)

The decoder is a Qwen2 in all but names (biases on q/k/v only, RMSNorm, SwiGLU, RoPE over
the whole head), so it is parsed into vlm's TextConfig as one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from vlmcli.config import MultiModalConfig, ProjectionConfig, VisionConfig, text_from_hf
from vlmcli.errors import CheckpointError, UnsupportedModelError

VISION_MODEL_TYPE = "qwen_vl_visual"

# visual.py's VisionTransformer arguments as Qwen-VL-Chat's config.json gives them
_VISUAL_DEFAULTS: dict[str, Any] = dict(
    image_size=448, patch_size=14, width=1664, layers=48, heads=16, mlp_ratio=4.9231,
    output_dim=4096, n_queries=256,
)

# modeling_qwen.py's QWenConfig defaults (what a sparse config.json leaves out)
_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=151936, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
    intermediate_size=22016, layer_norm_epsilon=1e-6, rotary_emb_base=10000, rotary_pct=1.0,
    seq_length=8192, max_position_embeddings=8192, use_dynamic_ntk=True, use_logn_attn=True,
    no_bias=True, tie_word_embeddings=False,
)

# <img> is the 215th special token: <|endoftext|>, <|im_start|>, <|im_end|>, 205 <|extra_N|>,
# <ref>, </ref>, <box>, </box>, <quad>, </quad>, then <img>
_IMG_AFTER_EOT = 214

# The resampler's heads are output_dim // 128 in visual.py, whatever the tower's heads are.
RESAMPLER_HEAD_DIM = 128


@dataclass(frozen=True)
class QwenVisualConfig(VisionConfig):
    """The 448 px ViT: no class token, pre-LayerNorm (eps 1e-6), exact GELU, a conv
    without bias; its learned positions are a 16 x 16 grid interpolated to the patch grid."""

    model_type: str = VISION_MODEL_TYPE
    activation: str = "gelu"
    class_token: bool = False
    pre_layernorm: bool = True
    patch_bias: bool = False
    n_positions: int = 256  # rows of positional_embedding (a square grid)
    output_dim: int = 4096  # the resampler's width
    n_queries: int = 256  # the resampler's learnable queries: visual tokens per image


@dataclass(frozen=True)
class QwenVLConfig(MultiModalConfig):
    seq_length: int = 2048  # the trained context: dynamic NTK and logn scaling start past it
    use_dynamic_ntk: bool = False
    use_logn_attn: bool = False

    def tokens_per_view(self) -> int:
        return self.vision.n_queries

    def max_visual_tokens(self) -> int:
        return self.vision.n_queries

    def image_tokens(self, height: int, width: int, n_images: int = 1) -> int:
        return self.vision.n_queries

    def vision_layers_needed(self) -> int:
        return self.vision.n_layers  # the resampler reads the last block's output

    def validate(self) -> None:
        super().validate()
        v = self.vision
        for name, n in (("n_queries", v.n_queries), ("positional_embedding rows", v.n_positions)):
            if math.isqrt(n) ** 2 != n:
                raise CheckpointError(f"config.json: visual {name} {n} is not a square grid")
        if v.image_size % v.patch_size:
            raise CheckpointError(
                f"config.json: visual image_size {v.image_size} is not a multiple of patch_size {v.patch_size}"
            )
        if self.seq_length < 2:
            # logn scaling divides by log(seq_length)
            raise CheckpointError(f"config.json: seq_length must be at least 2, not {self.seq_length}")
        if v.output_dim % RESAMPLER_HEAD_DIM or v.output_dim % 2:
            raise CheckpointError(
                f"config.json: visual output_dim {v.output_dim} is not a multiple of {RESAMPLER_HEAD_DIM}"
            )


def _int(cfg: dict[str, Any], key: str, defaults: dict[str, Any], where: str) -> int:
    value = cfg.get(key, defaults[key])
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"config.json: {where}{key} must be an integer, not {value!r}")
    return value


def visual_from_hf(cfg: dict[str, Any]) -> QwenVisualConfig:
    get = lambda key: _int(cfg, key, _VISUAL_DEFAULTS, "visual.")  # noqa: E731
    width = get("width")
    ratio = cfg.get("mlp_ratio", _VISUAL_DEFAULTS["mlp_ratio"])
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
        raise CheckpointError(f"config.json: visual.mlp_ratio must be a positive number, not {ratio!r}")
    return QwenVisualConfig(
        image_size=get("image_size"),
        patch_size=get("patch_size"),
        d_vision=width,
        n_layers=get("layers"),
        n_heads=get("heads"),
        d_ff=int(width * ratio),  # visual.py: mlp_width = int(d_model * mlp_ratio) (8192 for bigG)
        norm_eps=1e-6,  # partial(nn.LayerNorm, eps=1e-6) everywhere in visual.py
        output_dim=get("output_dim"),
        n_queries=get("n_queries"),
    )


def parse_qwen_vl(cfg: dict[str, Any]) -> QwenVLConfig:
    get = lambda key: cfg.get(key, _TEXT_DEFAULTS[key])  # noqa: E731
    visual_cfg = cfg.get("visual")
    if not isinstance(visual_cfg, dict):
        raise CheckpointError("config.json has no 'visual' object: a text-only Qwen (model_type qwen) is not supported")
    vision = visual_from_hf(visual_cfg)
    rotary_pct = float(get("rotary_pct"))
    if rotary_pct != 1.0:
        # every published Qwen-VL rotates the whole head; a partial rotary needs its own RoPE
        raise UnsupportedModelError(f"rotary_pct {rotary_pct} is not supported in Qwen-VL (supported: 1.0)")
    if not get("no_bias"):
        raise UnsupportedModelError("no_bias false (biases on c_proj and the MLP) is not supported in Qwen-VL")
    d_model = int(get("hidden_size"))
    n_heads = int(get("num_attention_heads"))
    head_dim = int(cfg.get("kv_channels", d_model // n_heads))
    if head_dim * n_heads != d_model:
        # c_attn is (3 * d_model, d_model) and split into thirds: the heads fill the width
        raise CheckpointError(f"config.json: kv_channels {head_dim} x {n_heads} heads is not hidden_size {d_model}")
    seq_length = int(get("seq_length"))
    start = visual_cfg.get("image_start_id", 151857)
    if isinstance(start, bool) or not isinstance(start, int) or start < _IMG_AFTER_EOT:
        raise CheckpointError(f"config.json: visual.image_start_id must be an id past the special tokens, not {start!r}")
    # tokenization_qwen.py numbers its special tokens in one fixed order after the ranks, so
    # <img>'s id gives the others: <|endoftext|>, <|im_start|>, <|im_end|> come first
    eot = start - _IMG_AFTER_EOT
    dynamic_ntk, logn = bool(get("use_dynamic_ntk")), bool(get("use_logn_attn"))
    # past seq_length the decoder rescales RoPE (dynamic NTK) and the queries (logn), as
    # modeling_qwen.py does; the context is max_position_embeddings either way
    context = int(get("max_position_embeddings"))
    text = text_from_hf(dict(
        model_type="qwen2",
        vocab_size=int(get("vocab_size")),
        hidden_size=d_model,
        num_hidden_layers=int(get("num_hidden_layers")),
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        head_dim=head_dim,
        intermediate_size=int(get("intermediate_size")) // 2,  # QWenMLP: w1, w2 are ff // 2 wide
        rms_norm_eps=float(get("layer_norm_epsilon")),
        rope_theta=float(get("rotary_emb_base")),
        max_position_embeddings=context,
        tie_word_embeddings=bool(get("tie_word_embeddings")),
        hidden_act="silu",
        # qwen_generation_utils' stop words: <|im_end|> and <|im_start|> for chatml, <|endoftext|>
        # (generation_config.json's eos) for raw; a base model seldom writes the ChatML two
        bos_token_id=None,
        eos_token_id=[eot, eot + 1, eot + 2],
    ))
    # a Qwen2 in its math; named for what it is (`vlm info`: "qwen decoder")
    text = dataclasses.replace(text, model_type="qwen")
    if vision.output_dim != text.d_model:
        raise CheckpointError(f"config.json: visual.output_dim {vision.output_dim} is not hidden_size {text.d_model}")
    projection = ProjectionConfig(
        d_vision=vision.d_vision, d_language=vision.output_dim, projection_type="cross_attention", bias=False,
        activation="none",  # one attention layer, ln_post and a matrix: no activation function
    )
    return QwenVLConfig(
        model_type=cfg["model_type"],
        vision=vision,
        projection=projection,
        text=text,
        # <imgpad>, the id the published tokenizer pads an image span with, is ours too:
        # <img> + 256 x <imgpad> + </img>, <imgpad> = <img> + 2 in tokenization_qwen.py
        image_token_id=int(start) + 2,
        vision_feature_layers=(-1,),
        vision_feature_select_strategy="full",
        raw=cfg,
        seq_length=seq_length,
        use_dynamic_ntk=dynamic_ntk,
        use_logn_attn=logn,
    )
