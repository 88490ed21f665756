"""The backend registry: names and options, `auto`, and every refusal with its exact message
and exit code. Nothing here quantizes (see test_quantized.py), so these tests are fast."""

from __future__ import annotations

import pytest
import torch

import backends
from backends.bnb import Int4Backend, Int8Backend
from backends.cpu import CpuBackend, CpuBf16Backend
from backends.cuda import CudaBackend, CudaBf16Backend
from vlmcli.cli import main
from vlmcli.errors import UsageError
from vlmcli.quantization import Quantization

NO_CUDA = torch.version.cuda is None


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("cpu", ("cpu", {})),
        (" CPU ", ("cpu", {})),
        ("bf16", ("cuda-bf16", {})),
        ("int4:fp4,dq", ("int4", {"fp4": None, "dq": None})),
        ("int8:threshold=4.5", ("int8", {"threshold": "4.5"})),
        ("int4:nf4, all ,", ("int4", {"nf4": None, "all": None})),
    ],
)
def test_parse_spec(spec, expected):
    assert backends.parse_spec(spec) == expected


def test_names_listed_in_help_order():
    assert backends.names() == ["auto", "cpu", "cpu-bf16", "cuda", "bf16", "int8", "int4", "q8", "q4"]


@pytest.mark.parametrize(
    "spec, cls, attrs",
    [
        ("cpu", CpuBackend, {"dtype": torch.float32}),
        ("cpu-bf16", CpuBf16Backend, {"dtype": torch.bfloat16}),
        ("cuda", CudaBackend, {"dtype": torch.float16}),
        ("bf16", CudaBf16Backend, {"dtype": torch.bfloat16}),
        ("int8", Int8Backend, {"threshold": 6.0, "quantize_all": False, "prequantized": False}),
        ("int8:threshold=0,all", Int8Backend, {"threshold": 0.0, "quantize_all": True}),
        ("int4", Int4Backend, {"quant_type": "nf4", "double_quant": False}),
        ("int4:fp4,dq,device=cpu", Int4Backend, {"quant_type": "fp4", "double_quant": True, "device": torch.device("cpu")}),
    ],
)
def test_build(spec, cls, attrs):
    backend = backends.build(spec)
    assert type(backend) is cls
    assert isinstance(backend, backends.Backend)
    for key, value in attrs.items():
        assert getattr(backend, key) == value


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tpu", "unknown backend 'tpu' (choose from: auto, cpu, cpu-bf16, cuda, bf16, int8, int4, q8, q4)"),
        ("cpu:fast", "backend 'cpu' takes no options"),
        ("auto:nf4", "backend 'auto' takes no options"),
        ("int8:fp4", "backend 'int8' has no option 'fp4' (options: all, device, threshold)"),
        ("int4:threshold=3", "backend 'int4' has no option 'threshold' (options: all, device, dq, fp4, nf4)"),
        ("int8:threshold", "option 'threshold' of backend 'int8' needs a value (threshold=...)"),
        ("int8:threshold=high", "threshold must be a number, not 'high'"),
        ("int8:threshold=-1", "threshold must be 0 (no outlier split) or more"),
        ("int4:dq=yes", "option 'dq' of backend 'int4' takes no value"),
        ("int4:nf4,fp4", "choose one of nf4 and fp4"),
        ("int4:device=tpu", "device must be cpu or cuda, not 'tpu'"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(UsageError) as e:
        backends.build(spec)
    assert str(e.value) == message


def test_auto_without_a_gpu_is_cpu_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert type(backends.get_backend("auto")) is CpuBackend


def test_auto_with_a_gpu_is_cuda_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    backend = backends.build("auto")
    assert type(backend) is CudaBackend and backend.dtype == torch.float16


@pytest.mark.parametrize(
    "quant, cls, attrs",
    [
        (Quantization("int8", threshold=4.0), Int8Backend, {"threshold": 4.0, "prequantized": True}),
        (Quantization("int4", quant_type="fp4", double_quant=True), Int4Backend, {"quant_type": "fp4", "double_quant": True}),
    ],
)
def test_auto_loads_a_quantized_checkpoint_in_its_own_format(quant, cls, attrs):
    backend = backends.get_backend("auto", quant)
    assert type(backend) is cls and backend.prequantized
    for key, value in attrs.items():
        assert getattr(backend, key) == value
    # prequantized: full-precision layers in such a checkpoint are never quantized again
    assert not backend.quantizes("decoder.layers.0.mlp.up_proj")


def test_bnb_backend_quantizes_the_decoder_only_by_default():
    backend = backends.build("int8")
    assert backend.quantizes("decoder.layers.3.self_attn.q_proj")
    for name in ("vision.encoder.layers.0.mlp.fc1", "projector.linear_1", "decoder.lm_head"):
        assert not backend.quantizes(name)
        assert backends.build("int8:all").quantizes(name)


@pytest.mark.parametrize(
    "spec, quant, message",
    [
        ("int4", Quantization("int8"), "this checkpoint is quantized to int8: load it with -b int8 (or auto), or with -b cpu / -b cuda to dequantize it"),
        ("int8", Quantization("int4", quant_type="nf4"), "this checkpoint is quantized to nf4: load it with -b int4 (or auto), or with -b cpu / -b cuda to dequantize it"),
        ("int4:fp4", Quantization("int4", quant_type="nf4"), "this checkpoint is quantized to nf4, not fp4"),
        ("int8:all", Quantization("int8"), "option 'all' quantizes while loading; this checkpoint is already quantized"),
    ],
)
def test_format_mismatch_refused(spec, quant, message):
    with pytest.raises(UsageError) as e:
        backends.get_backend(spec, quant)
    assert str(e.value) == message


@pytest.mark.skipif(not NO_CUDA, reason="the message is for a torch built without CUDA")
def test_cuda_refused_on_a_cpu_only_torch(capsys, test_image):
    """Fails before anything is read: the model given does not even exist."""
    code, out, err = run(capsys, "describe", test_image, "-m", "./no/such/model", "-b", "cuda")
    assert code == 2 and out == ""
    assert err == (
        f"error: backend 'cuda' is not available: this PyTorch ({torch.__version__}) is built without "
        "CUDA; install a CUDA build of torch\n"
    )


def test_cuda_refused_without_a_visible_gpu(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cuda", "bf16", "int8:device=cuda"):
        with pytest.raises(UsageError) as e:
            backends.get_backend(spec)
        assert str(e.value) == (
            f"backend '{spec}' is not available: no CUDA GPU is visible to PyTorch "
            "(check the driver, nvidia-smi and CUDA_VISIBLE_DEVICES)"
        )


def test_bf16_refused_on_a_gpu_without_it(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert backends.get_backend("cuda").dtype == torch.float16
    with pytest.raises(UsageError) as e:
        backends.get_backend("bf16")
    assert str(e.value) == (
        "backend 'bf16' is not available: Tesla T4 (compute capability 7.5) has no native bf16; use cuda (fp16)"
    )


def test_fp16_on_the_cpu_refused(capsys, llava_ckpt, test_image):
    code, out, err = run(capsys, "describe", test_image, "-m", llava_ckpt, "-b", "cpu-fp16")
    assert code == 2 and out == ""
    assert err == (
        "error: backend 'cpu-fp16' is not available: fp16 on the CPU is slow and overflows easily; "
        "use cpu (fp32) or cpu-bf16\n"
    )


@pytest.fixture
def no_bitsandbytes(monkeypatch):
    import backends.bnb

    monkeypatch.setattr(backends.bnb, "_DIST", "bitsandbytes_is_not_installed_here")


def test_bitsandbytes_missing_refused(capsys, no_bitsandbytes, llava_ckpt, test_image):
    code, out, err = run(capsys, "describe", test_image, "-m", llava_ckpt, "-b", "int4")
    assert code == 2 and out == ""
    assert err == (
        "error: backend 'int4' is not available: bitsandbytes is not installed "
        "(pip install 'bitsandbytes>=0.48')\n"
    )


def test_bitsandbytes_missing_for_a_quantized_checkpoint(no_bitsandbytes):
    quant = Quantization("int4", quant_type="nf4")
    for spec in ("auto", "cpu"):
        with pytest.raises(UsageError) as e:
            backends.get_backend(spec, quant)
        assert str(e.value) == (
            "this checkpoint is nf4 (bitsandbytes 4-bit): bitsandbytes is not installed "
            "(pip install 'bitsandbytes>=0.48')"
        )


def test_cpu_bf16_runs_the_tiny_model(llava_ckpt, test_image):
    """bf16 on the CPU follows fp32 closely (the tiny model's logits reach ~11)."""
    from vlmcli.pipeline import Pipeline
    from vlmcli.preprocess import load_image, preprocess_batch

    ref, bf16 = Pipeline.load(str(llava_ckpt), "cpu"), Pipeline.load(str(llava_ckpt), "cpu-bf16")
    assert bf16.model.decoder.layers[0].mlp.gate_up_proj.weight.dtype == torch.bfloat16
    pixels = preprocess_batch([load_image(test_image)], ref.image_config)
    ids = torch.tensor([[1, 5, 9, 12, 40, 41, 42]])
    with torch.inference_mode():
        want = ref.model(ids, None, None, last_only=False)
        got = bf16.model(ids, None, None, last_only=False).float()
        assert bf16.model.encode_images(pixels.bfloat16()).dtype == torch.bfloat16
    # measured: 0.037 of the logits' scale (bf16 keeps 8 bits of mantissa)
    assert (got - want).abs().max() <= 0.08 * want.abs().max()


def test_convert_needs_bitsandbytes_only_to_quantize(capsys, no_bitsandbytes, llava_ckpt, tmp_path):
    code, out, err = run(capsys, "convert", llava_ckpt, tmp_path / "q", "--to", "nf4")
    assert (code, out) == (2, "")
    assert err == "error: converting to nf4 needs bitsandbytes: bitsandbytes is not installed (pip install 'bitsandbytes>=0.48')\n"
    code, out, err = run(capsys, "convert", llava_ckpt, tmp_path / "h", "--to", "bf16", "-q")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h"]


@pytest.mark.parametrize("shape", [(48, 32), (32, 32), (7, 5)])
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_cpu_layers_with_more_outputs_are_stored_transposed(shape, bias):
    """The layout only: the same products (to fp32 rounding) and the same `weight`."""
    from torch import nn

    from backends.base import TransposedLinear, dense_linear

    gen = torch.Generator().manual_seed(0)
    w16 = torch.randn(shape, generator=gen).half()  # as stored; converted while laid out
    b = torch.randn(shape[0], generator=gen) if bias else None
    layer = dense_linear(w16, b, torch.device("cpu"), torch.float32)
    assert isinstance(layer, TransposedLinear)
    assert layer.weight_t.is_contiguous() and layer.weight_t.shape == (shape[1], shape[0])
    assert torch.equal(layer.weight, w16.float())
    x = torch.randn(2, 3, shape[1], generator=gen)
    expected = nn.functional.linear(x, w16.float(), b)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "shape, device_dtype", [((32, 48), torch.float32), ((48, 32), torch.bfloat16)], ids=["fewer-outputs", "bf16"]
)
def test_other_layers_stay_nn_linear(shape, device_dtype):
    from torch import nn

    from backends.base import dense_linear

    layer = dense_linear(torch.randn(shape), None, torch.device("cpu"), device_dtype)
    assert type(layer) is nn.Linear and layer.weight.dtype == device_dtype


def test_tied_embedding_reads_the_transposed_head(make_llava):
    """One matrix for both: the embedding is a view of lm_head's transposed storage."""
    from vlmcli.pipeline import Pipeline

    dec = Pipeline.load(str(make_llava(tie_word_embeddings=True)), "cpu").model.decoder
    head, emb = dec.lm_head, dec.embed_tokens.weight
    assert emb.untyped_storage().data_ptr() == head.weight_t.untyped_storage().data_ptr()
    ids = torch.tensor([[1, 5, 7]])
    assert torch.equal(dec.embed_tokens(ids)[0], head.weight_t[:, [1, 5, 7]].t())


@pytest.mark.parametrize("spec", ["cpu", "cpu-bf16"])
def test_dense_backends_fuse_qkv_and_gate_up_from_the_stored_weights(llava_ckpt, spec):
    """One product for q/k/v and one for gate/up, holding exactly the checkpoint's rows in order."""
    from safetensors.torch import load_file

    from vlmcli.pipeline import Pipeline

    dtype = torch.float32 if spec == "cpu" else torch.bfloat16
    stored = load_file(str(llava_ckpt / "model.safetensors"))
    prefix = next(k for k in stored if k.endswith("layers.0.self_attn.q_proj.weight")).removesuffix("self_attn.q_proj.weight")
    block = Pipeline.load(str(llava_ckpt), spec).model.decoder.layers[0]
    assert block.self_attn.attention_dtype == backends.build(spec).attention_dtype  # what setup was told
    assert not hasattr(block.self_attn, "q_proj") and not hasattr(block.mlp, "up_proj")
    qkv = torch.cat([stored[f"{prefix}self_attn.{p}_proj.weight"] for p in "qkv"])
    gate_up = torch.cat([stored[f"{prefix}mlp.{p}_proj.weight"] for p in ("gate", "up")])
    assert torch.equal(block.self_attn.qkv_proj.weight, qkv.to(dtype))
    assert torch.equal(block.mlp.gate_up_proj.weight, gate_up.to(dtype))


def test_bf16_products_over_many_rows_run_in_fp32(monkeypatch):
    """Without bf16 kernels: up to 8 rows a bf16 product, past that an fp32 product of the same
    bf16 values rounded to bf16 once; attention in fp32. With them: plain bf16 layers."""
    import torch.nn.functional as F
    from torch import nn

    import backends.cpu as cpu
    from backends.cpu import UpcastLinear

    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 32, generator=gen), torch.randn(48, generator=gen)
    monkeypatch.setattr(cpu, "fast_bf16_matmul", lambda: False)
    backend = CpuBf16Backend()
    assert backend.attention_dtype == torch.float32
    layer = backend.make_linear("decoder.layers.0.mlp.up_proj", w, b)
    assert isinstance(layer, UpcastLinear)
    wb, bb = w.bfloat16(), b.bfloat16()
    real_linear, computed_in = F.linear, []

    def spy(x, weight, bias=None):  # which product ran: small sizes round alike either way
        computed_in.append(x.dtype)
        return real_linear(x, weight, bias)

    monkeypatch.setattr(F, "linear", spy)
    few = torch.randn(1, 8, 32, generator=gen).bfloat16()
    assert torch.equal(layer(few), real_linear(few, wb, bb))
    many = torch.randn(1, 9, 32, generator=gen).bfloat16()
    got = layer(many)
    assert computed_in == [torch.bfloat16, torch.float32]
    monkeypatch.setattr(F, "linear", real_linear)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, F.linear(many.float(), wb.float(), bb.float()).bfloat16())
    # the same values as the emulated bf16 product, up to the rounding of its sums
    torch.testing.assert_close(got.float(), F.linear(many, wb, bb).float(), rtol=2**-7, atol=2**-7)

    monkeypatch.setattr(cpu, "fast_bf16_matmul", lambda: True)
    assert backend.attention_dtype is None
    assert type(backend.make_linear("decoder.layers.0.mlp.up_proj", w, b)) is nn.Linear
