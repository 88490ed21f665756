"""Qwen2.5-VL against transformers on tiny random checkpoints (tests/qwen2_5_vl_checkpoints.py):
the window order (transformers' get_vision_window_index), the merged visual tokens and the
logits at every position within a measured tolerance, greedy tokens identical (non-square
images, two images of different sizes in one prompt, text only, a text-only chat turn after
an image turn), windows that matter, --max-pixels, and the hub layout of
Qwen/Qwen2.5-VL-3B-Instruct at full size on meta.

The processor, prompt, positions and decoder are Qwen2-VL's; the Qwen2-VL tests that take
the `qwen` fixture run here again on this family's checkpoint (imported below)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.qwen2_5_vl_checkpoints import make_qwen2_5_vl_checkpoint, reference_processor  # noqa: E402
from tests.test_parity_qwen2_vl import (  # noqa: E402  (the shared tests run on this module's fixture too)
    BIG, PROMPTS, SMALL, TALL, WIDE, _pil, _to_hub_names, check_parity, test_chat_text_turn_after_an_image_turn,
    test_context_refusal_names_both_numbers, test_tensor_slot_step_equals_eager_step, test_text_only_parity,
)
from vlmcli.cli import main  # noqa: E402
from vlmcli.families import describe, family_for, parse_config  # noqa: E402
from vlmcli.families.qwen2_vl.vision import window_order  # noqa: E402
from vlmcli.generate import Timings  # noqa: E402
from vlmcli.pipeline import Pipeline  # noqa: E402

# measured on these checkpoints in float32 on CPU (worst case over the six cases of
# test_qwen2_5_vl_matches_transformers): features 3.0e-7, logits 2.5e-6 of the largest
# reference value (0.0 for the first images tried); check_parity asserts 1e-5 for both

# Qwen2-VL's tests that hold for this family as they are, collected again here with this
# module's `qwen` fixture: text only, chat turns after an image, the tensor-slot step, the
# context refusal
SHARED_TESTS = (test_text_only_parity, test_chat_text_turn_after_an_image_turn, test_tensor_slot_step_equals_eager_step,
                test_context_refusal_names_both_numbers)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = make_qwen2_5_vl_checkpoint(tmp_path_factory.mktemp("qwen25vl"))
    ref = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return path, ref, reference_processor(path), Pipeline.load(str(path), "cpu")


@pytest.mark.parametrize("window", [56, 112, 224])
def test_window_order_is_transformers(window):
    from transformers.vision_utils import get_vision_window_index

    # patch grids (t, h, w): several images, edges cut short, a 2-frame grid, one block
    grids = [(1, 8, 12), (1, 4, 6), (2, 10, 6), (1, 2, 2), (1, 34, 20), (1, 16, 16)]
    order, lengths = window_order(grids, 2, window // 14 // 2)
    ref_order, cu = get_vision_window_index(torch.tensor(grids), 2, window, 14)
    assert torch.equal(order, ref_order)
    assert lengths == torch.diff(cu).tolist()


def test_pixels_are_qwen2vl_image_processors(qwen, make_test_image):
    _, _, processor, ours = qwen
    for size in (WIDE, BIG, (600, 410)):
        image = make_test_image(size=size, seed=3)
        prepared = ours.prepare_images([image], Timings())
        expected = processor.image_processor(images=[_pil(image)], return_tensors="pt")
        assert torch.equal(prepared.pixels, expected["pixel_values"])
        assert [list(g) for g in prepared.grids] == expected["image_grid_thw"].tolist()


def test_qwen2_5_vl_matches_transformers(qwen, make_test_image):
    wide, tall, small, big = (make_test_image(size=s, seed=i) for i, s in enumerate((WIDE, TALL, SMALL, BIG)))
    cases = [([wide], PROMPTS[0]), ([tall], PROMPTS[1]), ([big], PROMPTS[0]), ([small], PROMPTS[1]),
             ([wide, tall], PROMPTS[0]), ([big, small], PROMPTS[1])]
    worst = {"features": 0.0, "logits": 0.0}
    distinct = set()
    for images, prompt in cases:
        answer, measured = check_parity(qwen, images, prompt)
        distinct.add(len(set(answer.tokens)))
        worst = {k: max(worst[k], measured[k]) for k in worst}
    assert max(distinct) >= 8, distinct
    print(f"qwen2_5_vl: {worst}")


def test_windows_and_full_attention_blocks_matter(qwen, make_test_image):
    """The BIG image's 6x4 blocks make 3x2 windows of 2x2 blocks: attending over the whole
    image in every block, or in none, gives other features than transformers'."""
    _, ref, processor, ours = qwen
    image = make_test_image(size=BIG, seed=2)
    prepared = ours.prepare_images([image], Timings())
    inputs = processor.image_processor(images=[_pil(image)], return_tensors="pt")
    tower = ours.model.vision
    cfg = tower.cfg
    with torch.inference_mode():
        expected = ref.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]
        ).pooler_output[0]
        assert torch.allclose(ours.encode_prepared(prepared, Timings())[0], expected, rtol=0, atol=1e-5)
        for changed in (dict(window_size=0), dict(fullatt_block_indexes=())):
            tower.cfg = dataclasses.replace(cfg, **changed)
            try:
                other = ours.encode_prepared(prepared, Timings())[0]
            finally:
                tower.cfg = cfg
            assert (other - expected).abs().max() > 1e-2, changed


@pytest.mark.parametrize("rows", [7, 8, 64])
def test_features_in_row_chunks_are_transformers(qwen, make_test_image, monkeypatch, rows):
    """The token-wise parts a few rows at a time (ROWS is 1024 in use; these images have
    fewer patches), two images: the same features as transformers'."""
    from vlmcli.families.qwen2_vl import vision

    _, ref, processor, ours = qwen
    images = [make_test_image(size=BIG, seed=2), make_test_image(size=WIDE, seed=3)]
    prepared = ours.prepare_images(images, Timings())
    inputs = processor.image_processor(images=[_pil(i) for i in images], return_tensors="pt")
    monkeypatch.setattr(vision, "ROWS", rows)
    with torch.inference_mode():
        expected = ref.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]
        ).pooler_output
        got = ours.encode_prepared(prepared, Timings())
    for a, b in zip(got, expected):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_max_pixels_through_describe(capsys, qwen, make_test_image):
    path, _, processor, _ = qwen
    image = make_test_image(size=BIG, seed=4)
    for flags, longest in (([], None), (["--max-pixels", 28 * 28 * 8], 28 * 28 * 8)):
        code = main(["describe", str(image), "-m", str(path), "-b", "cpu", "--max-tokens", "2", "--json", *map(str, flags)])
        out, err = capsys.readouterr()
        assert code == 0, err
        size = {"shortest_edge": processor.image_processor.size["shortest_edge"],
                "longest_edge": longest or processor.image_processor.size["longest_edge"]}
        t, h, w = processor.image_processor(images=[_pil(image)], size=size, return_tensors="pt")["image_grid_thw"][0]
        assert json.loads(out)["image_tokens"] == int(t * h * w) // 4


# ---- the hub layout: Qwen/Qwen2.5-VL-3B-Instruct at full size, on meta --------------------------

# config.json of Qwen/Qwen2.5-VL-3B-Instruct (the decoder's keys at the top level)
HUB_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
    "max_window_layers": 70, "model_type": "qwen2_5_vl", "num_attention_heads": 16, "num_hidden_layers": 36,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.41.2",
    "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}


@pytest.mark.parametrize("layout", ["hub", "transformers5"])
def test_hub_key_layout_loads(layout, monkeypatch, tmp_path):
    from backends.cpu import CpuBackend
    from vlmcli import loader

    with torch.device("meta"):
        model = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig.from_dict(HUB_3B))
    tensors = {k: (tuple(v.shape), "BF16") for k, v in model.state_dict().items()}
    if layout == "hub":
        tensors = {_to_hub_names(k): v for k, v in tensors.items()}
        tensors.pop("lm_head.weight", None)  # tied: the 3B repo stores embed_tokens only
        for expected in ("visual.patch_embed.proj.weight", "visual.blocks.31.attn.qkv.weight",
                         "visual.blocks.0.norm1.weight", "visual.blocks.0.mlp.gate_proj.bias",
                         "visual.blocks.0.mlp.up_proj.weight", "visual.blocks.7.mlp.down_proj.weight",
                         "visual.merger.ln_q.weight", "visual.merger.mlp.0.weight", "visual.merger.mlp.2.weight",
                         "model.layers.35.self_attn.q_proj.bias", "model.embed_tokens.weight", "model.norm.weight"):
            assert expected in tensors, expected
        assert "visual.blocks.0.norm1.bias" not in tensors  # RMSNorm
    (tmp_path / "config.json").write_text(json.dumps(HUB_3B))
    monkeypatch.setattr(loader, "weight_files", lambda folder: None)
    monkeypatch.setattr(loader, "tensor_shapes", lambda files: tensors)
    monkeypatch.setattr(loader, "iter_tensors", lambda files: iter(()))
    loaded = loader.load_model(tmp_path, CpuBackend())
    assert loaded.config.text.tie_word_embeddings
    assert set(loaded.unused_tensors) <= {"lm_head.weight"}
    family = family_for(HUB_3B)
    ours = {n: tuple(p.shape) for n, p in loaded.model.named_parameters()}
    mapped = {family.weight_name(k): shape for k, (shape, _) in tensors.items()}
    assert set(ours) - {"decoder.lm_head.weight"} <= set(mapped)
    for name, shape in ours.items():
        if name != "decoder.lm_head.weight":
            assert mapped[name] == shape, name
    assert ours["vision.patch_embed.proj.weight"] == (1280, 3, 2, 14, 14)
    assert ours["vision.blocks.0.mlp.gate_proj.weight"] == (3420, 1280)
    assert ours["projector.mlp.2.weight"] == (2048, 5120)


def test_7b_config_reads_as_qwen2_5_vl():
    """Qwen/Qwen2.5-VL-7B-Instruct: a wider decoder, untied, the merger out to 3584."""
    hub_7b = {**HUB_3B, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
              "num_hidden_layers": 28, "num_key_value_heads": 4, "max_window_layers": 28,
              "tie_word_embeddings": False, "vocab_size": 152064,
              "vision_config": {**HUB_3B["vision_config"], "out_hidden_size": 3584}}
    _, cfg = parse_config(hub_7b)
    assert cfg.text.d_model == 3584 and cfg.text.head_dim == 128 and not cfg.text.tie_word_embeddings
    assert cfg.vision.d_out == 3584 and cfg.projection.d_language == 3584
    with torch.device("meta"):
        ref = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig.from_dict(hub_7b))
        ours = family_for(hub_7b).build(cfg, True)
    theirs = {family_for(hub_7b).weight_name(k): tuple(v.shape) for k, v in ref.state_dict().items()}
    mine = {n: tuple(p.shape) for n, p in ours.named_parameters()}
    assert mine == {k: v for k, v in theirs.items() if k is not None}


def test_hub_config_reads_as_qwen2_5_vl():
    family, cfg = parse_config(HUB_3B)
    assert family.name == "Qwen2.5-VL" and describe(HUB_3B).startswith("Qwen2.5-VL (")
    assert "112 px windows" in describe(HUB_3B)
    v = cfg.vision
    assert (v.d_vision, v.d_ff, v.d_out, v.n_layers, v.n_heads) == (1280, 3420, 2048, 32, 16)
    assert (v.norm, v.gated_mlp, v.window_size, v.fullatt_block_indexes) == ("rms", True, 112, (7, 15, 23, 31))
    assert cfg.mrope_section == (16, 24, 24) and cfg.text.head_dim == 128 and cfg.text.n_kv_heads == 2
    assert cfg.text.sliding_window is None and cfg.text.tie_word_embeddings
    assert cfg.projection.d_vision == 5120 and cfg.projection.d_language == 2048
