"""q8 and q4 (backends/weight_only.py): PyTorch's weight-only int8 / int4 CPU kernels.

1. Each kernel's product against an explicit dequantize-then-matmul written here (the codes
   and scales the quantizer produced, dequantized by the formula the format defines, times
   the bf16-rounded input in float64): the only difference left is the kernel's bf16 output.
2. The quantizers' own error (half a step per weight) and the shapes the kernels cannot take
   (kept fp32 with one notice), the layer policy, the options, the memory `vlm info` shows.
3. Real weights: SmolLM2-135M (the smollm2_llava fixture) answers the capital question as
   fp32 does, the logit error measured and asserted; the demo model's held-out accuracy
   (training/eval_demo.py) within 0.02 of fp32.
"""

from __future__ import annotations

import pytest
import torch

from backends import build, get_backend
from backends.base import TransposedLinear
from backends.weight_only import (
    INT4_GROUPS,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    Q4Backend,
    Q8Backend,
    q4_bytes,
    q8_bytes,
    quantize_int4,
    quantize_int8,
)
from vlmcli.errors import UsageError
from vlmcli.pipeline import Pipeline


def _dequantize_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """w = q * scale, one scale per output row."""
    return codes.double() * scales.double()[:, None]


def _dequantize_int4(codes: torch.Tensor, scale_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """w = (q - 8) * scale + zero, one (scale, zero) per `group` inputs of a row; scale_zeros
    is (in / group, out, 2) as the kernel takes it."""
    scales = scale_zeros[..., 0].double().t().repeat_interleave(group, dim=1)  # (out, in)
    zeros = scale_zeros[..., 1].double().t().repeat_interleave(group, dim=1)
    return (codes.double() - 8) * scales + zeros


def _reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # the kernels take bf16 input (the layers round it): the reference starts from the same
    return x.to(torch.bfloat16).double() @ weight.t()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


# Kernel vs reference, max |diff| / max |ref|, measured on an AVX-512 EPYC (torch 2.13) over
# the shapes below and 1, 5 and 64 rows: int8 at most 3.1e-3, int4 3.7e-3, which is the bf16
# output (2^-9 relative per value); bounded at about twice that for the other CPU kinds'
# kernel paths (AVX2, AMX), whose sums run in another order.
KERNEL_REL = 8e-3
ROWS = (1, 5, 64)  # a decode step, a short chunk, a prefill


@pytest.mark.parametrize("shape", [(64, 96), (17, 64), (960, 576), (576, 1536), (4099, 576)])
def test_int8_kernel_matches_dequantized_reference(shape):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen) * 0.05
    bias = torch.randn(shape[0], generator=gen)
    layer = Int8WeightOnlyLinear.quantize(weight, bias)
    w = _dequantize_int8(layer.codes, layer.scales)
    # the quantizer: half a step per weight at most (steps of the bf16 scale)
    step = layer.scales.double()[:, None]
    assert ((w - weight.double()).abs() <= step / 2 + 1e-12).all()
    for rows in ROWS:
        x = torch.randn(2, rows, shape[1], generator=gen)
        got = layer(x)
        assert got.shape == (2, rows, shape[0]) and got.dtype == torch.float32
        want = _reference(x.reshape(-1, shape[1]), w) + bias.double()
        assert _rel(got.reshape(-1, shape[0]), want) <= KERNEL_REL
    # past wide_rows (a long prefill) the layer dequantizes and multiplies in fp32: the input
    # is not rounded, the product is fp32's (measured: at most 4e-7 of the largest value)
    x = torch.randn(layer.wide_rows + 1, shape[1], generator=gen)
    want = x.double() @ w.t() + bias.double()
    assert _rel(layer(x), want) <= 2e-6


@pytest.mark.parametrize(
    "shape, group",
    [((64, 96), 32), ((17, 64), 64), ((960, 576), 32), ((960, 576), 64), ((576, 1536), 128), ((576, 1536), 256),
     ((4099, 576), 32)],  # 17 and 4099 rows: padded to a multiple of 16 and sliced
)
def test_int4_kernel_matches_dequantized_reference(shape, group):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(shape, generator=gen) * 0.05
    codes, scale_zeros = quantize_int4(weight, group)
    assert codes.min() >= 0 and codes.max() <= 15 and scale_zeros.shape == (shape[1] // group, shape[0], 2)
    w = _dequantize_int4(codes, scale_zeros, group)
    step = scale_zeros[..., 0].double().t().repeat_interleave(group, dim=1)
    # half a step per weight, plus the bf16 rounding of each group's offset (2^-9 of it)
    slack = scale_zeros[..., 1].double().abs().t().repeat_interleave(group, dim=1) * 2**-8
    assert ((w - weight.double()).abs() <= step / 2 + slack).all()
    layer = Int4WeightOnlyLinear.quantize(weight, None, group)
    assert (layer.out_features, layer.in_features) == shape
    for rows in ROWS:
        x = torch.randn(rows, shape[1], generator=gen)
        got = layer(x)
        assert got.shape == (rows, shape[0])
        assert _rel(got, _reference(x, w)) <= KERNEL_REL


def test_int4_constant_group_and_zero_rows():
    """A group of equal weights, and an all-zero row, come back as they were."""
    weight = torch.zeros(16, 64)
    weight[1] = 0.25
    weight[2, :32] = -1.0
    layer = Int4WeightOnlyLinear.quantize(weight, None, 32)
    got = layer(torch.eye(64))  # column j: the weights of input j
    assert torch.equal(got.t(), weight)
    layer8 = Int8WeightOnlyLinear.quantize(weight, None)
    assert torch.equal(layer8(torch.eye(64)).t(), weight)


def test_kernel_shapes_outside_kernels_stay_fp32_with_one_notice():
    notices: list[str] = []
    q4 = Q4Backend(group=64)
    q4.notice = notices.append
    name = "decoder.layers.0.mlp.down_proj"
    assert isinstance(q4.make_linear(name, torch.randn(64, 96), None), (torch.nn.Linear, TransposedLinear))
    assert isinstance(q4.make_linear("decoder.layers.1.mlp.down_proj", torch.randn(64, 37), None), (torch.nn.Linear, TransposedLinear))
    assert isinstance(q4.make_linear(name, torch.randn(24, 128), None), Int4WeightOnlyLinear)  # rows are padded
    assert notices == [
        "q4: decoder.layers.0.mlp.down_proj (64 x 96) and any other layer whose inputs are not a multiple "
        "of 64 stay fp32; PyTorch's int4 kernel cannot take them"
    ]
    assert q4.kept_dense == ["decoder.layers.0.mlp.down_proj", "decoder.layers.1.mlp.down_proj"]
    q8 = Q8Backend()
    q8.notice = notices.append
    assert isinstance(q8.make_linear(name, torch.randn(16, 37), None), (torch.nn.Linear, TransposedLinear))
    assert isinstance(q8.make_linear(name, torch.randn(17, 96), None), Int8WeightOnlyLinear)
    assert notices[-1].startswith("q8: decoder.layers.0.mlp.down_proj (16 x 37) and any other layer whose inputs are not a multiple of 32")


@pytest.mark.parametrize(
    "spec, cls, attrs",
    [
        ("q8", Q8Backend, {"quantize_head": False, "quantize_all": False}),
        ("q8:lm_head", Q8Backend, {"quantize_head": True, "quantize_all": False}),
        ("q4", Q4Backend, {"group": 32, "quantize_head": False}),
        ("q4:group=64,lm_head", Q4Backend, {"group": 64, "quantize_head": True}),
        ("Q4:all", Q4Backend, {"quantize_head": True, "quantize_all": True}),
    ],
)
def test_build(spec, cls, attrs):
    backend = get_backend(spec)
    assert type(backend) is cls and backend.device.type == "cpu" and backend.dtype == torch.float32
    for key, value in attrs.items():
        assert getattr(backend, key) == value


@pytest.mark.parametrize(
    "spec, message",
    [
        ("q4:group=48", "q4 group size must be one of 32, 64, 128, 256, not 48"),
        ("q4:group=x", "group must be a whole number, not 'x'"),
        ("q4:group", "option 'group' of backend 'q4' needs a value (group=32)"),
        ("q8:group=32", "backend 'q8' has no option 'group' (options: all, lm_head)"),
        ("q8:lm_head=1", "option 'lm_head' of backend 'q8' takes no value"),
        ("q4:dq", "backend 'q4' has no option 'dq' (options: all, group, lm_head)"),
    ],
)
def test_bad_options(spec, message):
    with pytest.raises(UsageError) as e:
        build(spec)
    assert str(e.value) == message


def test_unknown_backend_lists_q8_and_q4():
    with pytest.raises(UsageError) as e:
        build("q3")
    assert str(e.value) == "unknown backend 'q3' (choose from: auto, cpu, cpu-bf16, cuda, bf16, int8, int4, q8, q4)"


def test_linear_bytes_are_the_layers_buffers():
    """What `vlm info` adds up is what the built layers hold (codes, scales; int4 rows padded)."""
    for backend, shape in ((Q8Backend(), (960, 576)), (Q4Backend(), (49153, 576)), (Q4Backend(group=64), (576, 1536))):
        name = "decoder.layers.0.mlp.gate_up_proj"
        layer = backend.make_linear(name, torch.randn(shape), None)
        held = sum(b.numel() * b.element_size() for b in layer.buffers())
        assert backend.linear_bytes(name, *shape) == held
    assert q8_bytes(960, 576) == 960 * 576 + 2 * 960
    assert q4_bytes(49153, 576, 32) == 49168 * 288 + 49168 * 18 * 4
    # not quantized by default: fp32; a shape the kernel cannot take: fp32
    assert Q4Backend().linear_bytes("decoder.lm_head", 49153, 576) == 49153 * 576 * 4
    assert Q4Backend(quantize_head=True).linear_bytes("decoder.lm_head", 49153, 576) == q4_bytes(49153, 576, 32)
    assert Q4Backend().linear_bytes("vision.layers.0.mlp.fc1", 64, 64) == 64 * 64 * 4
    assert Q4Backend().linear_bytes("decoder.layers.0.mlp.down_proj", 64, 37) == 64 * 37 * 4


def _kinds(pipe) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in pipe.model.named_modules() if type(m).__name__.endswith("WeightOnlyLinear")}


@pytest.mark.parametrize("spec", ["q8", "q4"])
def test_policy_and_fusion_on_the_tiny_llava(llava_ckpt, test_image, spec, capsys):
    """Decoder blocks quantized (q/k/v and gate/up fused first: one layer each), the vision
    tower, projector and lm_head fp32; the answer is a normal answer."""
    from vlmcli.generate import SamplingOptions
    from vlmcli.sequence import user_message

    pipe = Pipeline.load(str(llava_ckpt), spec)
    kinds = _kinds(pipe)
    n_layers = len(pipe.model.decoder.layers)
    assert sorted({n.rsplit(".", 1)[1] for n in kinds}) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert len(kinds) == 4 * n_layers
    assert not any(n.startswith(("vision", "projector", "decoder.lm_head")) for n in kinds)
    assert capsys.readouterr().err == ""  # every decoder shape fits: no notice
    opts = SamplingOptions(max_new_tokens=8, temperature=0)
    assert len(pipe.ask([user_message("What is in the picture?", 1)], [test_image], opts).tokens) > 0


def test_lm_head_option_on_a_tied_model(make_llava):
    """A tied lm_head gets its own quantized copy; the embedding keeps its fp32 rows."""
    path = make_llava(tie_word_embeddings=True)
    dense = Pipeline.load(str(path), "q8")
    assert isinstance(dense.model.decoder.lm_head, TransposedLinear)  # shared with the embedding
    pipe = Pipeline.load(str(path), "q8:lm_head")
    head, embed = pipe.model.decoder.lm_head, pipe.model.decoder.embed_tokens
    assert isinstance(head, Int8WeightOnlyLinear)
    assert torch.equal(embed.weight, dense.model.decoder.embed_tokens.weight)
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        got = pipe.model(ids, None, pipe.model.new_cache(3), last_only=False)
        want = dense.model(ids, None, dense.model.new_cache(3), last_only=False)
    assert _rel(got, want.double()) <= 0.05


def test_all_quantizes_the_vision_tower_and_projector(llava_ckpt, capsys):
    kinds = _kinds(Pipeline.load(str(llava_ckpt), "q8:all"))
    assert any(n.startswith("vision.") for n in kinds) and any(n.startswith("projector.") for n in kinds)
    assert "decoder.lm_head" in kinds
    # the tiny CLIP's d_ff is 37 (tests/checkpoints.py): its fc2 layers stay fp32, said once
    err = capsys.readouterr().err
    assert err.count("stay fp32") == 1 and "fc2 (32 x 37)" in err, err


# ---- real weights --------------------------------------------------------------------------

# SmolLM2-135M, logits at every position of question + answer against fp32 (teacher-forced,
# as tests/test_quantized.py does), measured on this machine:
#   q8          max_rel 0.050  mean KL 0.0061  top-1 0.95   answer's first position 0.058
#   q8:lm_head  max_rel 0.052  mean KL 0.0076  top-1 0.95                           0.071
#   q4 (g32)    max_rel 0.044  mean KL 0.0030  top-1 0.98                           0.030
#   q4:group=64 max_rel 0.577  mean KL 0.66    top-1 0.63                           0.40
# q4 in groups of 32 is near-lossless here because the fixture's weights came from a Q4_1
# GGUF (4-bit codes with a min and a step per 32 weights: exactly representable); its
# embedding (the tied lm_head) is Q8_0, so an int4 lm_head (q4:lm_head: mean KL 0.044) is
# what costs: there it no longer answers word for word. Bounds: about twice the measured.
SMOLLM2_BOUNDS = {
    "q8": {"max_rel": 0.1, "mean_kl": 0.015, "top1": 0.9, "first_rel": 0.12},
    "q8:lm_head": {"max_rel": 0.1, "mean_kl": 0.015, "top1": 0.9, "first_rel": 0.14},
    "q4": {"max_rel": 0.09, "mean_kl": 0.008, "top1": 0.93, "first_rel": 0.06},
    "q4:group=64": {"max_rel": 0.8, "mean_kl": 1.2, "top1": 0.5, "first_rel": 0.6},
}


# as tests/test_quantized.py asks (not imported from there: it needs bitsandbytes)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris"


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_llava):
    from tests.quantized_checkpoints import our_logits
    from vlmcli.sequence import build_sequence

    fp32 = Pipeline.load(str(smollm2_llava), "cpu")
    question = build_sequence(
        fp32.tokenizer, QUESTION, image_token_id=fp32.config.image_token_id,
        tokens_per_image=fp32.tokens_per_image, context_length=fp32.context_length,
    ).ids
    answer = fp32.tokenizer.encode(ANSWER)
    inputs = {"input_ids": torch.tensor([question + answer])}
    reference = our_logits(fp32, inputs)
    assert reference[0, len(question) - 1 : -1].argmax(-1).tolist() == answer  # fp32 answers so
    return inputs, reference, len(question), answer


@pytest.mark.slow
@pytest.mark.parametrize("spec", list(SMOLLM2_BOUNDS))
def test_smollm2_close_to_fp32(smollm2_llava, smollm2_reference, spec):
    from tests.quantized_checkpoints import divergence, our_logits

    inputs, reference, n_question, answer = smollm2_reference
    pipe = Pipeline.load(str(smollm2_llava), spec)
    got = our_logits(pipe, inputs)
    d = divergence(got, reference)
    first = n_question - 1  # the position that predicts the answer's first token
    d["first_rel"] = ((got[0, first] - reference[0, first]).abs().max() / reference[0, first].abs().max()).item()
    bounds = SMOLLM2_BOUNDS[spec]
    assert all(d[k] <= bounds[k] for k in ("max_rel", "mean_kl", "first_rel")) and d["top1"] >= bounds["top1"], d
    assert got[0, first:-1].argmax(-1).tolist() == answer  # greedy decoding gives fp32's answer


@pytest.mark.slow
def test_smollm2_greedy_answer_decoded(smollm2_llava):
    """Decoded for real (not teacher-forced): q8 and q4 answer as fp32 does."""
    from vlmcli.generate import SamplingOptions

    opts = SamplingOptions(max_new_tokens=12, temperature=0)
    texts = {spec: Pipeline.load(str(smollm2_llava), spec).ask(QUESTION, [], opts).text for spec in ("cpu", "q8", "q4")}
    assert texts == {spec: ANSWER + "." for spec in texts}


@pytest.mark.slow
def test_demo_accuracy_within_two_points_of_fp32():
    """training/eval_demo.py's held-out scenes (20 of them here, ~20 s per backend on 2 cores;
    `python -m training.eval_demo -b q4` runs the full 300): caption pairs and QA accuracy of
    q8 and q4 within 0.02 of fp32's. Measured on 30 scenes: fp32, q8 and q4 all 0.967 pairs
    named; QA 120/143, 121/143, 122/143."""
    from training.eval_demo import evaluate, held_out_set

    items = held_out_set(20)
    scores = {}
    for spec in ("cpu", "q8", "q4"):
        report = evaluate(backend=spec, items=items)
        right = sum(r for r, _ in report.qa.values())
        asked = sum(a for _, a in report.qa.values())
        scores[spec] = (report.pairs, right / asked)
    for spec in ("q8", "q4"):
        assert abs(scores[spec][0] - scores["cpu"][0]) <= 0.02, scores
        assert abs(scores[spec][1] - scores["cpu"][1]) <= 0.02, scores


# ---- threads (--threads / VLM_THREADS) --------------------------------------------------------


def test_threads_default_to_the_physical_cores_and_follow_vlm_threads(monkeypatch):
    import os

    from vlmcli.cli.common import physical_cores, set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("VLM_THREADS", raising=False)
        assert set_threads() == physical_cores() == torch.get_num_threads()
        monkeypatch.setenv("VLM_THREADS", "1")
        assert set_threads() == 1 == torch.get_num_threads() and os.environ["OMP_NUM_THREADS"] == "1"
        assert set_threads(2) == 2 == torch.get_num_threads()
        monkeypatch.setenv("VLM_THREADS", "two")
        with pytest.raises(UsageError, match="VLM_THREADS must be a whole number, not 'two'"):
            set_threads()
    finally:
        torch.set_num_threads(before)
