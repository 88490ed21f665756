"""PaliGemma (SigLIP + Gemma) and PaliGemma 2 (SigLIP + Gemma2) against transformers'
PaliGemmaForConditionalGeneration and PaliGemmaProcessor, on tiny random checkpoints that
transformers wrote (tests/paligemma_checkpoints.py): the prompt ids (image tokens, <bos>,
the prompt, "\\n"), pixel values (bit-identical), the projected image features, logits at
every position, and greedy tokens for two prompts on non-square images.

Tolerances (fp32, CPU): features within 1e-5 and logits within 1e-4 of their scale, as in
test_parity_families.py. Measured on this machine: 0.0 for features and logits in every
variant (PaliGemma: the same SDPA calls; PaliGemma 2: the soft-capped attention in
transformers' eager order), and the greedy tokens identical with 16-24 distinct tokens out
of 24. Without the prefix mask the logits are off by more than their scale. Mutations caught:
no post_layernorm; the window applied inside the prefix. (RoPE counted from 1, as
transformers' PaliGemma does, is kept for exactness but is invisible at these tolerances:
RoPE scores depend on relative positions only.)

The prefix-LM mask is checked to matter (causal-only logits are far off), and for
PaliGemma 2 that the sliding layers let the whole prefix see itself (the window is 8
tokens, the prefix 30+): transformers ORs its blockwise prefix onto the sliding causal mask.

Then the hub layouts: google/paligemma-3b-mix-224 and google/paligemma2-3b-pt-224's
config.json (as those repos carry them) built at full size on the meta device, with the
tensor names of their safetensors, load through our weight names with the right shapes.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.paligemma_checkpoints import make_paligemma_checkpoint  # noqa: E402
from vlmcli.generate import SamplingOptions, Timings  # noqa: E402
from vlmcli.pipeline import Pipeline  # noqa: E402
from vlmcli.sequence import user_message  # noqa: E402

FEATURE_RTOL = 1e-5  # max |ours - ref| / max |ref|
LOGIT_RTOL = 1e-4
NEW_TOKENS = 24
PROMPTS = ("caption en", "What is in the picture?")

VARIANTS = {
    "paligemma": dict(text="gemma"),
    "paligemma2": dict(text="gemma2"),
    # transformers 5's in-memory names (model.language_model.*, lm_head, model.vision_tower.*)
    "paligemma2-module-layout": dict(text="gemma2", key_layout="module"),
}
MEASURED: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="session")
def make_paligemma(tmp_path_factory):
    built = {}

    def factory(**kwargs):
        key = json.dumps(kwargs, sort_keys=True)
        if key not in built:
            digest = hashlib.sha1(key.encode()).hexdigest()[:10]
            built[key] = make_paligemma_checkpoint(tmp_path_factory.mktemp(f"paligemma-{digest}"), **kwargs)
        return built[key]

    return factory


@pytest.fixture(scope="module")
def loaded(make_paligemma):
    cache = {}

    def get(variant):
        if variant not in cache:
            path = make_paligemma(**VARIANTS[variant])
            ref = transformers.PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
            processor = transformers.AutoProcessor.from_pretrained(path)
            cache[variant] = (path, ref, processor, Pipeline.load(str(path), "cpu"))
        return cache[variant]

    return get


def _inputs(processor, prompt, image_path):
    from PIL import Image

    # the prompt as users give it: no <image> in the text, the processor puts the images first
    return processor(text=prompt, images=Image.open(image_path).convert("RGB"), return_tensors="pt")


def check_parity(loaded, variant, image, prompt):
    path, ref, processor, ours = loaded(variant)
    inputs = _inputs(processor, prompt, image)
    messages = [user_message(prompt, 1)]
    prepared = ours.prepare_images([image], Timings())
    seq = ours.build_prompt(messages, prepared.token_counts)
    # 1. ids: <image> x 25, <bos>, the prompt, "\n"; all of it the bidirectional prefix
    assert seq.ids == inputs["input_ids"][0].tolist()
    assert seq.prefix == len(seq.ids) and inputs["token_type_ids"].sum() == 0
    # 2. pixels
    assert torch.equal(prepared.pixels, inputs["pixel_values"])
    measured = {}
    with torch.inference_mode():
        # 3. features: SigLIP's last hidden state (post_layernorm), projected
        ref_feats = ref.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        our_feats = ours.encode_prepared(prepared, Timings())
        assert our_feats.shape == ref_feats.shape
        scale = ref_feats.abs().max().item()
        measured["features"] = (our_feats - ref_feats).abs().max().item() / scale
        assert measured["features"] <= FEATURE_RTOL
        # 4. logits at every position
        ref_logits = ref(**inputs).logits
        ids = inputs["input_ids"]
        our_logits = ours.model(ids, prepared.pixels, ours.model.new_cache(ids.shape[1]), last_only=False, prefix=seq.prefix)
        scale = ref_logits.abs().max().item()
        measured["logits"] = (our_logits - ref_logits).abs().max().item() / scale
        assert measured["logits"] <= LOGIT_RTOL
        # the prefix mask matters: causal attention over the prompt gives other logits
        causal = ours.model(ids, prepared.pixels, ours.model.new_cache(ids.shape[1]), last_only=False, prefix=0)
        measured["causal_only"] = (causal - ref_logits).abs().max().item() / scale
        assert measured["causal_only"] > 100 * LOGIT_RTOL
        # 5. greedy tokens
        ref_out = ref.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    ref_tokens = ref_out[0, ids.shape[1] :].tolist()
    answer = ours.ask(messages, [image], SamplingOptions(max_new_tokens=NEW_TOKENS, temperature=0))
    assert answer.tokens == [t for t in ref_tokens if t not in ours.stop_ids]
    assert len(set(answer.tokens)) >= 8, answer.tokens
    assert answer.finish_reason == "length"
    MEASURED.setdefault(variant, {})
    for k, v in measured.items():
        MEASURED[variant][k] = max(MEASURED[variant].get(k, 0.0), v)
    return answer, measured


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_transformers(loaded, make_test_image, variant, prompt):
    size = (64, 48) if prompt == PROMPTS[0] else (40, 72)  # non-square both ways
    check_parity(loaded, variant, make_test_image(size=size), prompt)


def test_sliding_layers_see_the_whole_prefix(loaded, make_test_image):
    """PaliGemma 2's sliding layers (window 8) attend over the whole 30+ token prefix: with
    the window applied inside the prefix too, the logits differ from transformers'."""
    from vlmcli.model import decoder as decoder_module

    path, ref, processor, ours = loaded("paligemma2")
    assert ours.config.text.sliding_window == 8 and ours.config.text.sliding_layers == (0, 2)
    image = make_test_image(size=(64, 48))
    inputs = _inputs(processor, PROMPTS[0], image)
    ids = inputs["input_ids"]
    prepared = ours.prepare_images([image], Timings())
    original = decoder_module.slot_mask

    def window_inside_prefix(q, n_keys, device, window=None, prefix=0):
        mask = original(q, n_keys, device, None, prefix)
        if window is not None:
            mask &= torch.arange(n_keys, device=device)[None, :] > q - window
        return mask

    with torch.inference_mode():
        ref_logits = ref(**inputs).logits
        decoder_module.slot_mask = window_inside_prefix
        try:
            wrong = ours.model(ids, prepared.pixels, ours.model.new_cache(ids.shape[1]), last_only=False, prefix=ids.shape[1])
        finally:
            decoder_module.slot_mask = original
    assert (wrong - ref_logits).abs().max() > 100 * LOGIT_RTOL * ref_logits.abs().max()


@pytest.mark.parametrize("variant", ["paligemma", "paligemma2"])
def test_tensor_slot_step_matches_the_eager_step(loaded, make_test_image, variant):
    """The capturable step (slots and positions as tensors, the whole cache read under a
    mask) gives the eager step's logits: what CompiledStep runs."""
    path, ref, processor, ours = loaded(variant)
    image = make_test_image(size=(64, 48))
    prepared = ours.prepare_images([image], Timings())
    seq = ours.build_prompt([user_message(PROMPTS[0], 1)], prepared.token_counts)
    ids = torch.tensor([seq.ids])
    model = ours.model
    with torch.inference_mode():
        visual = ours.encode_prepared(prepared, Timings())
        a, b = model.new_cache(len(seq.ids) + 4), model.new_cache(len(seq.ids) + 4)
        la = model.prefill(ids, visual, a, prefix=seq.prefix)
        lb = model.prefill(ids, visual, b, prefix=seq.prefix)
        token = la.argmax(-1, keepdim=True)
        for i in range(3):
            pos = len(seq.ids) + i
            la = model.step(token, pos, a)
            lb = model.step(token, torch.tensor([pos]), b)
            assert torch.allclose(la, lb, rtol=0, atol=1e-5 * la.abs().max().item())
            token = la.argmax(-1, keepdim=True)


def test_describe_defaults_to_caption_and_chat_is_refused(loaded, make_test_image, capsys):
    from vlmcli.cli import main

    path, ref, processor, ours = loaded("paligemma")
    image = make_test_image(size=(64, 48))
    code = main(["describe", str(image), "-m", str(path), "--max-tokens", "6", "--json", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    record = json.loads(out)
    assert record["prompt"] == "caption en"
    inputs = _inputs(processor, "caption en", image)
    with torch.inference_mode():
        ref_out = ref.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert record["text"] == processor.decode(ref_out, skip_special_tokens=True)
    assert record["prompt_tokens"] == inputs["input_ids"].shape[1]

    code = main(["chat", "-m", str(path)])
    out, err = capsys.readouterr()
    assert code == 2
    assert "PaliGemma models answer one prompt at a time" in err and len(err.strip().splitlines()) <= 2, err


def test_measured_tolerances_are_reported():
    # run after the parity tests (file order); prints what the docstring states
    if MEASURED:
        print("measured", json.dumps(MEASURED, indent=1))


# ---- hub layouts ----------------------------------------------------------------------------

SIGLIP_SO400M_PG = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "model_type": "siglip_vision_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 27,
    "num_image_tokens": 256,
    "patch_size": 14,
    "projection_dim": 2048,
    "projector_hidden_act": "gelu_fast",
    "vision_use_head": False,
}

HUB_CONFIGS = {
    # as the repo carries it (transformers 4.41 era, sparse sub-configs)
    "google/paligemma-3b-mix-224": {
        "_name_or_path": "final-mix224",
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "bos_token_id": 2,
        "eos_token_id": 1,
        "hidden_size": 2048,
        "ignore_index": -100,
        "image_token_index": 257152,
        "model_type": "paligemma",
        "pad_token_id": 0,
        "projection_dim": 2048,
        "text_config": {
            "hidden_size": 2048,
            "intermediate_size": 16384,
            "model_type": "gemma",
            "num_attention_heads": 8,
            "num_hidden_layers": 18,
            "num_image_tokens": 256,
            "num_key_value_heads": 1,
            "torch_dtype": "float32",
            "vocab_size": 257216,
        },
        "torch_dtype": "float32",
        "transformers_version": "4.41.0.dev0",
        "vision_config": SIGLIP_SO400M_PG,
    },
    "google/paligemma2-3b-pt-224": {
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "bos_token_id": 2,
        "eos_token_id": 1,
        "hidden_size": 2048,
        "image_token_index": 257152,
        "model_type": "paligemma",
        "pad_token_id": 0,
        "projection_dim": 2304,
        "text_config": {
            "attn_logit_softcapping": 50.0,
            "cache_implementation": "hybrid",
            "final_logit_softcapping": 30.0,
            "head_dim": 256,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_size": 2304,
            "intermediate_size": 9216,
            "model_type": "gemma2",
            "num_attention_heads": 8,
            "num_hidden_layers": 26,
            "num_image_tokens": 256,
            "num_key_value_heads": 4,
            "query_pre_attn_scalar": 256,
            "sliding_window": 4096,
            "torch_dtype": "bfloat16",
            "vocab_size": 257216,
        },
        "torch_dtype": "bfloat16",
        "transformers_version": "4.47.0.dev0",
        "vision_config": {**SIGLIP_SO400M_PG, "projection_dim": 2304, "torch_dtype": "bfloat16"},
    },
}
HUB_CONFIGS["google/paligemma-3b-mix-448"] = {
    **HUB_CONFIGS["google/paligemma-3b-mix-224"],
    "vision_config": {**SIGLIP_SO400M_PG, "image_size": 448, "num_image_tokens": 1024},
}
HUB_CONFIGS["google/paligemma2-3b-mix-448"] = {
    **HUB_CONFIGS["google/paligemma2-3b-pt-224"],
    "vision_config": {**HUB_CONFIGS["google/paligemma2-3b-pt-224"]["vision_config"], "image_size": 448, "num_image_tokens": 1024},
}


def _hub_name(key: str) -> str:
    """transformers 5's parameter name -> the name in the google/paligemma* safetensors."""
    for module_prefix, hub_prefix in (
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if key.startswith(module_prefix):
            return hub_prefix + key[len(module_prefix) :]
    raise AssertionError(f"unexpected transformers parameter {key}")


def _module_tensors(cfg: dict) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = transformers.PaliGemmaForConditionalGeneration(transformers.PaliGemmaConfig.from_dict(cfg))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layout", ["hub", "transformers5"])
@pytest.mark.parametrize("repo", list(HUB_CONFIGS))
def test_hub_key_layout_loads(repo, layout, monkeypatch, tmp_path):
    from backends.cpu import CpuBackend
    from vlmcli import loader
    from vlmcli.errors import CheckpointError

    cfg = HUB_CONFIGS[repo]
    module = _module_tensors(cfg)
    if layout == "hub":  # no lm_head stored: tied to the embeddings
        tensors = {_hub_name(k): (s, "F32") for k, s in module.items() if k != "lm_head.weight"}
    else:
        tensors = {k: (s, "BF16") for k, s in module.items()}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(loader, "weight_files", lambda folder: None)
    monkeypatch.setattr(loader, "tensor_shapes", lambda files: tensors)
    monkeypatch.setattr(loader, "iter_tensors", lambda files: iter(()))
    loaded = loader.load_model(tmp_path, CpuBackend())
    # everything is used, post_layernorm included; a tied lm_head is the embedding
    assert loaded.unused_tensors == ([] if layout == "hub" else ["lm_head.weight"])
    parsed = loaded.config
    side = parsed.vision.image_size // parsed.vision.patch_size
    assert parsed.max_visual_tokens() == side * side == cfg["vision_config"]["num_image_tokens"]
    assert parsed.text.tie_word_embeddings and parsed.image_token_id == 257152
    missing = dict(tensors)
    missing.pop(next(k for k in tensors if k.endswith("post_layernorm.weight")))
    monkeypatch.setattr(loader, "tensor_shapes", lambda files: missing)
    with pytest.raises(CheckpointError, match="lacks 1 tensors"):
        loader.load_model(tmp_path, CpuBackend())


def test_hub_configs_read_as_paligemma():
    from vlmcli.families import describe, parse_config

    assert {repo: describe(cfg) for repo, cfg in HUB_CONFIGS.items()} == {
        "google/paligemma-3b-mix-224": "PaliGemma (SigLIP, linear projector, Gemma decoder)",
        "google/paligemma-3b-mix-448": "PaliGemma (SigLIP, linear projector, Gemma decoder)",
        "google/paligemma2-3b-pt-224": "PaliGemma (SigLIP, linear projector, Gemma2 decoder)",
        "google/paligemma2-3b-mix-448": "PaliGemma (SigLIP, linear projector, Gemma2 decoder)",
    }
    _, pg2 = parse_config(HUB_CONFIGS["google/paligemma2-3b-pt-224"])
    t = pg2.text
    assert (t.attn_logit_softcap, t.final_logit_softcap, t.attention_scale) == (50.0, 30.0, 256**-0.5)
    assert (t.sliding_window, t.sliding_layers[:3], t.sandwich_norms) == (4096, (0, 2, 4), True)
    assert (t.head_dim, t.n_kv_heads, t.embedding_multiplier, t.norm_offset) == (256, 4, 2304**0.5, 1.0)
    _, pg1 = parse_config(HUB_CONFIGS["google/paligemma-3b-mix-448"])
    assert (pg1.text.head_dim, pg1.text.n_kv_heads, pg1.max_visual_tokens()) == (256, 1, 1024)
    assert pg1.text.attn_logit_softcap is None and not pg1.text.sandwich_norms
