"""`vlm convert --to q8|q4`: vlm's weight-only checkpoints (vlmcli/quantization.py).

1. Loaded with -b q8 / -b q4 (or auto), a converted checkpoint gives exactly the logits and
   greedy tokens of quantizing the source while loading it with the same options, and no
   quantizer runs while it loads: the stored codes are the layers' codes.
2. The stored form: plain int8 codes, int4 codes two per byte (low nibble first), bf16
   scales and zeros, and config.json's quantization_config; sizes computed layer by layer.
3. Other backends dequantize it; other formats and contradicting options are refused in one
   line; a failed conversion leaves nothing; `vlm info` names the format.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")  # the fixtures' checkpoints and processor

import backends.weight_only as weight_only  # noqa: E402
from tests.quantized_checkpoints import our_logits, reference_inputs  # noqa: E402
from vlmcli.cli import main  # noqa: E402
from vlmcli.convert import ConvertOptions, convert  # noqa: E402
from vlmcli.generate import SamplingOptions  # noqa: E402
from vlmcli.pipeline import Pipeline  # noqa: E402
from vlmcli.quantization import QuantizedWeight  # noqa: E402
from vlmcli.sequence import user_message  # noqa: E402

PROMPT = "What is in the picture?"

# The tiny LLaVA's decoder (tests/checkpoints.py: hidden 64, MLP 96, 4 heads / 2 KV heads of
# 16, 2 layers): the Linear layers q8 / q4 quantize by default, (out, in) each.
DECODER_LAYERS = [(64, 64), (32, 64), (32, 64), (64, 64), (96, 64), (96, 64), (64, 96)] * 2


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def converted(llava_ckpt, tmp_path_factory):
    built = {}

    def factory(to, source=None, **opts):
        source = source or llava_ckpt
        key = (to, str(source), tuple(sorted(opts.items())))
        if key not in built:
            out = tmp_path_factory.mktemp(f"conv-{to}") / "out"
            built[key] = convert(str(source), out, ConvertOptions(to=to, **opts), download_progress=False)
        return built[key].output

    return factory


def _tensors(folder):
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _no_quantizing(monkeypatch):
    """Make the q8 / q4 quantizers fail: a load that calls one is quantizing again."""

    def refuse(*args, **kwargs):
        raise AssertionError("quantized while loading a prequantized checkpoint")

    monkeypatch.setattr(weight_only, "quantize_int8", refuse)
    monkeypatch.setattr(weight_only, "quantize_int4", refuse)


# ---- 1. the same layers as quantizing while loading ---------------------------------------


@pytest.mark.parametrize(
    "to, opts, spec",
    [
        ("q8", {}, "q8"),
        ("q4", {}, "q4"),
        ("q4", {"group": 64}, "q4:group=64"),  # down_proj's 96 inputs: stays fp32, in both
        ("q8", {"quantize_all": True}, "q8:all"),  # the vision tower's fc2 (37 inputs) stays fp32
        ("q4", {"quantize_head": True}, "q4:lm_head"),
    ],
)
def test_loads_exactly_what_quantizing_while_loading_builds(
    converted, llava_ckpt, test_image, monkeypatch, to, opts, spec
):
    path = converted(to, **opts)
    want_pipe = Pipeline.load(str(llava_ckpt), spec)
    inputs = reference_inputs(llava_ckpt, [test_image], PROMPT)
    want = our_logits(want_pipe, inputs)
    sampling = SamplingOptions(max_new_tokens=12, temperature=0)
    want_tokens = want_pipe.ask([user_message(PROMPT, 1)], [test_image], sampling).tokens

    with monkeypatch.context() as m:
        _no_quantizing(m)
        for backend in (spec.split(":")[0], "auto"):
            pipe = Pipeline.load(str(path), backend)
            assert pipe.backend.name == to and pipe.backend.prequantized
            assert torch.equal(our_logits(pipe, inputs), want)
    tokens = pipe.ask([user_message(PROMPT, 1)], [test_image], sampling).tokens
    assert tokens == want_tokens and len(tokens) == 12
    # the fused q/k/v and gate/up of each block are built from the parts' stored codes
    kinds = {n: type(m).__name__ for n, m in pipe.model.named_modules()}
    assert kinds["decoder.layers.0.self_attn.qkv_proj"].endswith("WeightOnlyLinear")


def test_a_tied_head_is_quantized_from_the_stored_embedding(make_llava, converted, test_image):
    """A tied lm_head is the embedding matrix: stored once, in full precision; the checkpoint
    says to quantize it, and loading does so as `-b q8:lm_head` does."""
    source = make_llava(num_key_value_heads=4, tie_word_embeddings=True)
    path = converted("q8", source=source, quantize_head=True)
    q = json.loads((path / "config.json").read_text())["quantization_config"]
    assert q["quantize_lm_head"] is True and q["modules_to_not_convert"][-1] == "lm_head"
    assert not any("lm_head" in k for k in _tensors(path))
    inputs = reference_inputs(source, [test_image], PROMPT)
    pipe = Pipeline.load(str(path), "auto")
    assert isinstance(pipe.model.decoder.lm_head, weight_only.Int8WeightOnlyLinear)
    assert torch.equal(our_logits(pipe, inputs), our_logits(Pipeline.load(str(source), "q8:lm_head"), inputs))


@pytest.mark.parametrize("fmt, spec", [("nf4", "q8"), ("nf4", "q4")])
def test_from_a_bitsandbytes_source(hf_quantized, converted, test_image, fmt, spec):
    """A bitsandbytes checkpoint is dequantized and quantized again, as -b q8 / q4 on it do."""
    source = hf_quantized(fmt)
    path = converted(spec, source=source)
    inputs = reference_inputs(source, [test_image], PROMPT)
    want = our_logits(Pipeline.load(str(source), spec), inputs)
    assert torch.equal(our_logits(Pipeline.load(str(path), "auto"), inputs), want)


def test_from_a_weight_only_source(converted, monkeypatch):
    """q8 -> q8 copies the codes (no quantizer runs); q8 -> q4 quantizes what q8 stands for."""
    q8 = converted("q8")
    with monkeypatch.context() as m:
        _no_quantizing(m)
        again = converted("q8", source=q8)
    a, b = _tensors(again), _tensors(q8)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    q4 = _tensors(converted("q4", source=q8))
    key = "language_model.model.layers.0.mlp.up_proj"
    stored = QuantizedWeight("q8", (96, 64), {"weight": b[f"{key}.weight"], "weight_scale": b[f"{key}.weight_scale"]})
    assert torch.equal(q4[f"{key}.weight"], weight_only.stored_int4(weight_only.dequantize(stored), 32)["weight"])


# ---- 2. the stored form ---------------------------------------------------------------------


def test_stored_tensors_and_config(converted, llava_ckpt):
    source = _tensors(llava_ckpt)
    key = "language_model.model.layers.1.mlp.down_proj"
    weight = source[f"{key}.weight"]  # (64, 96)

    q8 = _tensors(converted("q8"))
    codes, scales = q8[f"{key}.weight"], q8[f"{key}.weight_scale"]
    assert (codes.dtype, codes.shape, scales.dtype, scales.shape) == (torch.int8, (64, 96), torch.bfloat16, (64,))
    assert torch.equal(codes, torch.round(weight / scales.float()[:, None]).clamp(-127, 127).to(torch.int8))
    assert torch.equal(scales, (weight.abs().amax(1) / 127).to(torch.bfloat16))

    q4 = _tensors(converted("q4"))
    packed, scales, zeros = q4[f"{key}.weight"], q4[f"{key}.weight_scale"], q4[f"{key}.weight_zero"]
    assert (packed.dtype, packed.shape) == (torch.uint8, (64, 48))
    assert scales.dtype == zeros.dtype == torch.bfloat16 and scales.shape == zeros.shape == (64, 3)
    # input 2j in the low nibble of byte j, 2j + 1 in the high one
    codes = torch.empty(64, 96, dtype=torch.int64)
    codes[:, 0::2], codes[:, 1::2] = (packed & 15).long(), (packed >> 4).long()
    grouped = lambda t: t.float().repeat_interleave(32, dim=1)  # noqa: E731
    w = (codes - 8) * grouped(scales) + grouped(zeros)
    assert ((w - weight).abs() <= grouped(scales) / 2 + grouped(zeros).abs() * 2**-8).all()
    want_codes, want_sz = weight_only.quantize_int4(weight, 32)
    assert torch.equal(codes, want_codes.long()) and torch.equal(want_sz[..., 0].t(), scales)

    # the vision tower, projector and lm_head as the source stores them
    for name in ("vision_tower.encoder.layers.0.mlp.fc1.weight", "multi_modal_projector.linear_1.weight",
                 "language_model.lm_head.weight"):
        assert torch.equal(q4[name], source[name]), name

    config = json.loads((converted("q4") / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "vlm-weight-only",
        "format": "q4",
        "bits": 4,
        "group_size": 32,
        "symmetric": False,
        "scale_dtype": "bfloat16",
        "quantize_lm_head": False,
        "modules_to_not_convert": [
            "model.vision_tower", "vision_tower", "model.multi_modal_projector", "multi_modal_projector", "lm_head",
        ],
        "format_version": 1,
    }


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize(
    "to, opts, layer_bytes",
    [
        ("q8", {}, lambda o, i: o * i + 2 * o),  # int8 codes + a bf16 scale per row
        ("q4", {}, lambda o, i: o * i // 2 + 2 * 2 * o * (i // 32)),  # 4-bit codes + bf16 scale and zero per 32
    ],
)
def test_sizes(converted, llava_ckpt, to, opts, layer_bytes):
    path = converted(to, **opts)
    source = _tensor_bytes(_tensors(llava_ckpt))
    fp32 = sum(4 * o * i for o, i in DECODER_LAYERS)
    stored = sum(layer_bytes(o, i) for o, i in DECODER_LAYERS)
    assert _tensor_bytes(_tensors(path)) == source - fp32 + stored
    # measured: the decoder's layers 245,760 bytes in fp32, 63,232 as q8 (3.9x less), 38,400 as q4 (6.4x)
    assert (fp32, stored) == (245_760, 63_232 if to == "q8" else 38_400)
    weights = path / "model.safetensors"
    assert source - fp32 + stored < weights.stat().st_size < source - fp32 + stored + 40_000  # + the header


# ---- 3. other backends, refusals, failures, info -------------------------------------------


def test_dense_backends_dequantize(converted, llava_ckpt, test_image):
    """-b cpu on a q8 checkpoint: each layer is code * scale in fp32 (once, while loading),
    and the logits are q8's but for the kernels' rounding of activations to bf16."""
    path = converted("q8")
    stored = _tensors(path)
    pipe = Pipeline.load(str(path), "cpu")
    key = "language_model.model.layers.0.mlp.down_proj"
    layer = pipe.model.decoder.layers[0].mlp.down_proj
    assert torch.equal(layer.weight, stored[f"{key}.weight"].float() * stored[f"{key}.weight_scale"].float()[:, None])
    inputs = reference_inputs(llava_ckpt, [test_image], PROMPT)
    want = our_logits(Pipeline.load(str(path), "q8"), inputs)
    got = our_logits(pipe, inputs)
    assert (got - want).abs().max() <= 0.05 * want.abs().max()  # measured: 0.027 (bf16 activations in q8)


@pytest.mark.parametrize(
    "to, spec, message",
    [
        ("q8", "int8", "this checkpoint is quantized to q8 (vlm's weight-only format): load it with -b q8 (or auto), "
         "or with -b cpu to dequantize it"),
        ("q8", "q4", "this checkpoint is quantized to q8 (vlm's weight-only format): load it with -b q8 (or auto), "
         "or with -b cpu to dequantize it"),
        ("q4", "int4", "this checkpoint is quantized to q4 (vlm's weight-only format): load it with -b q4 (or auto), "
         "or with -b cpu to dequantize it"),
        ("q4", "q4:group=64", "this checkpoint is q4 in groups of 32, not 64: load it with -b q4 (its own group size)"),
        ("q8", "q8:lm_head", "option 'lm_head' quantizes while loading; this checkpoint is already quantized"),
        ("q4", "q4:all", "option 'all' quantizes while loading; this checkpoint is already quantized"),
    ],
)
def test_backends_that_contradict_the_checkpoint_are_refused(capsys, converted, test_image, to, spec, message):
    path = converted(to)
    code, out, err = run(capsys, "describe", test_image, "-m", path, "-b", spec, "--max-tokens", 2)
    assert (code, out, err) == (2, "", f"error: {message}\n")


def test_q4_group_given_as_the_checkpoint_has_it(converted):
    assert Pipeline.load(str(converted("q4")), "q4:group=32").backend.group == 32


@pytest.mark.parametrize(
    "args, message",
    [
        (["--to", "q8", "--group", "64"], "--group goes with --to q4"),
        (["--to", "int8", "--quantize-head"], "--quantize-head goes with --to q8 or q4 (with bitsandbytes formats, use --quantize-all)"),
        (["--to", "q4", "--group", "48"], "q4 group size must be one of 32, 64, 128, 256, not 48"),
    ],
)
def test_bad_options(capsys, llava_ckpt, tmp_path, args, message):
    code, out, err = run(capsys, "convert", llava_ckpt, tmp_path / "out", *args)
    assert (code, out, err) == (2, "", f"error: {message}\n")
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_and_verifies(capsys, llava_ckpt, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "convert", llava_ckpt, out, "--to", "q4", "--group", "64")
    assert code == 0, err
    assert stdout.startswith(f"wrote {out} (q4, groups of 64): 12 layers quantized, 23 kept, ")
    assert f"verified: {out} loads with -b q4 and runs" in err
    # the layers the kernel cannot take are named once, as a load names them
    assert err.count("stay fp32") == 1 and "down_proj (64 x 96)" in err
    record = json.loads((out / "vlm_provenance.json").read_text())
    assert record["to"] == "q4" and record["options"]["group"] == 64 and record["options"]["quantize_head"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_check_leaves_nothing(capsys, monkeypatch, llava_ckpt, tmp_path):
    """The written model is run before it is moved into place: logits that are not finite
    stop the conversion with one line, and neither OUTPUT nor a temporary folder remains."""
    monkeypatch.setattr(weight_only.Int8WeightOnlyLinear, "_product", lambda self, rows: torch.full(
        (rows.shape[0], self.out_features), float("nan"), dtype=rows.dtype))
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "convert", llava_ckpt, out, "--to", "q8", "-q")
    assert (code, stdout) == (1, "")
    assert err == (
        "error: the converted model failed its check, running it with -b q8: the first forward pass gives "
        f"logits that are not finite (NaN or inf); {out} was not written\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_info(capsys, converted):
    from tests.test_info import _allocated

    path = converted("q4", quantize_head=True)
    code, out, err = run(capsys, "info", path, "--json")
    assert code == 0 and err == ""
    data = json.loads(out)
    assert data["checkpoint"]["format"] == "q4 (vlm weight-only int4, groups of 32, lm_head too)"
    rows = {r["backend"]: r for r in data["backends"]}
    assert rows["q4"]["available"] and "prequantized" in rows["q4"]["description"]
    assert rows["q4"]["weights_bytes"] == _allocated(Pipeline.load(str(path), "q4").model)
    assert rows["cpu"]["weights_bytes"] == _allocated(Pipeline.load(str(path), "cpu").model)
    for name in ("int8", "int4", "q8"):
        assert rows[name]["available"] is False and "quantized to q4 (vlm's weight-only format)" in rows[name]["reason"]
    code, out, _ = run(capsys, "info", path)
    assert code == 0 and "checkpoint q4 (vlm weight-only int4, groups of 32, lm_head too)" in out


def _broken_copy(folder, tmp_path, *, config=None, tensors=None):
    import shutil

    from safetensors.torch import save_file

    out = tmp_path / "broken"
    shutil.copytree(folder, out)
    if config is not None:
        data = json.loads((out / "config.json").read_text())
        data["quantization_config"].update(config)
        (out / "config.json").write_text(json.dumps(data))
    if tensors is not None:
        stored = _tensors(out)
        stored.update(tensors)
        save_file(stored, out / "model.safetensors")
    return out


def test_broken_checkpoints_named(capsys, converted, tmp_path):
    q4 = converted("q4")
    key = "language_model.model.layers.0.mlp.up_proj"
    cases = [
        (dict(config={"format_version": 2}),
         "config.json: vlm-weight-only format_version 2 is not supported (this vlm reads 1)"),
        (dict(tensors={f"{key}.weight_zero": torch.zeros(96, 1, dtype=torch.bfloat16)}),
         f"q4 tensors '{key}.weight' [96, 32], '{key}.weight_scale' [96, 2], '{key}.weight_zero' [96, 1] BF16 do not "
         "fit config.json's [96, 64] (expected [96, 32] codes and BF16 [96, 64 / group] scales and zeros)"),
    ]
    for i, (change, message) in enumerate(cases):
        path = _broken_copy(q4, tmp_path / str(i), **change)
        code, out, err = run(capsys, "info", path)
        assert (code, out, err) == (1, "", f"error: {message}\n")
