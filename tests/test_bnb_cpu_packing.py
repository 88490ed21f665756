"""bitsandbytes' packed 4-bit CPU kernel (AVX512-BF16), on every kind of CPU.

bitsandbytes decides per Linear4bit, when it is built, from has_avx512bf16(): where it
holds, the first CPU forward repacks the weight and computes in bf16, and the repacking
fails for shapes other than out % 32 == 0 and in % 64 == 0 (in transformers too). vlm keeps
those layers on the generic fp32 path (backends/bnb.py). The tests below force the decision
both ways (has_avx512bf16 patched where Linear4bit reads it, for vlm's layers and
transformers' alike), so both branches run on any machine; the packed kernel itself exists
only on CPUs with AVX512-BF16, so its arithmetic is checked there and skipped elsewhere.
"""

from __future__ import annotations

import copy
import itertools
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")

from backends import bnb as vlm_bnb  # noqa: E402
from tests.quantized_checkpoints import (  # noqa: E402
    VLM_SKIP,
    bnb_config,
    greedy_reference,
    load_reference,
    our_logits,
    reference_inputs,
)
from vlmcli.generate import SamplingOptions  # noqa: E402
from vlmcli.pipeline import Pipeline  # noqa: E402
from vlmcli.sequence import user_message  # noqa: E402

NATIVE = bool(bnb.functional.has_avx512bf16())  # this CPU has the packed kernel
PROMPT = "What is in the picture?"
# The tiny LLaVA's decoder (hidden 64, MLP 96, 2 KV heads of 16): every layer packs but
# down_proj (96 inputs).
DOWN_PROJ = ["decoder.layers.0.mlp.down_proj", "decoder.layers.1.mlp.down_proj"]
NOTICE = (
    "int4: decoder.layers.0.mlp.down_proj (64 x 96) and any other layer whose outputs are not a multiple "
    "of 32 or inputs not a multiple of 64 run on bitsandbytes' generic fp32 path; its AVX512-BF16 kernel, "
    "used for the rest, cannot take them"
)


def _linear4bit(out_f, in_f, quant_type="nf4", double_quant=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32, quant_type=quant_type, device="meta")
    layer.weight = bnb.nn.Params4bit(
        torch.randn(out_f, in_f, generator=gen), requires_grad=False, blocksize=64,
        compress_statistics=double_quant, quant_type=quant_type, quant_storage=torch.uint8, module=layer,
    ).to("cpu")
    return layer


@pytest.mark.parametrize("double_quant", [False, True])
def test_cpu_packing_fits_exactly_the_shapes_bitsandbytes_can_repack(double_quant):
    """cpu_packing_fits against bitsandbytes' own repacking (plain torch: runs on any CPU),
    so a bitsandbytes that changes its conditions is noticed; where it repacks, its inverse
    gives back the same bytes."""
    for out_f, in_f in itertools.product([32, 37, 48, 64, 96, 160], [32, 37, 64, 96, 128, 192]):
        layer = _linear4bit(out_f, in_f, double_quant=double_quant)
        data, state = layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state)
        try:
            packed, packed_state = bnb.functional._convert_weight_packed_for_cpu(data.clone(), copy.deepcopy(state))
        except (AssertionError, RuntimeError):
            repacks = False
        else:
            repacks = True
            back, _ = bnb.functional._convert_weight_packed_for_cpu_inverse(packed, packed_state)
            assert torch.equal(back, data), (out_f, in_f)
        assert vlm_bnb.cpu_packing_fits(out_f, in_f) == repacks, (out_f, in_f)


@pytest.mark.parametrize("packed", [False, True], ids=["generic", "packed"])
def test_forced_decision_kept_per_layer(llava_ckpt, monkeypatch, packed):
    """Forced either way: vlm's layers get exactly bitsandbytes' decision, less the layers
    it cannot repack, and the notice says so once (nothing when nothing was changed)."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: packed)
    notices = []
    monkeypatch.setattr(vlm_bnb.BnbBackend, "notice", staticmethod(notices.append))
    ours = Pipeline.load(str(llava_ckpt), "int4")
    layers = {n: m for n, m in ours.model.named_modules() if type(m).__name__ == "Linear4bit"}
    assert len(layers) == 14
    want = {n: packed and n not in DOWN_PROJ for n in layers}
    assert {n: m.support_avx512bf16_for_cpu for n, m in layers.items()} == want
    assert ours.backend.unpacked == (DOWN_PROJ if packed else [])
    assert notices == ([NOTICE] if packed else [])
    # every layer left on the packed path repacks (the step that failed before)
    for name, layer in layers.items():
        if want[name]:
            bnb.functional._convert_weight_packed_for_cpu(layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state))


@pytest.mark.parametrize("packed", [False, True], ids=["generic", "packed"])
@pytest.mark.parametrize("spec, fmt, dq", [("int4", "nf4", False), ("int4:fp4,dq", "fp4", True)])
def test_forced_decision_matches_transformers(llava_ckpt, test_image, monkeypatch, packed, spec, fmt, dq):
    """The same decision in transformers (bitsandbytes' own, with the layers it cannot
    repack on the generic path, as load_reference does): identical logits at every position
    and identical greedy tokens, on both paths. After the run, the layers that were to pack
    hold the packed layout (the packed kernel ran) and the others do not."""
    if packed and not NATIVE:
        pytest.skip("bitsandbytes' packed 4-bit kernel needs a CPU with AVX512-BF16")
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: packed)
    monkeypatch.setattr(vlm_bnb.BnbBackend, "notice", staticmethod(lambda message: None))
    ref = load_reference(llava_ckpt, bnb_config(fmt, double_quant=dq, skip=VLM_SKIP))
    ours = Pipeline.load(str(llava_ckpt), spec)
    inputs = reference_inputs(llava_ckpt, [test_image], PROMPT)
    with torch.inference_mode():
        want = ref(**inputs).logits
    got = our_logits(ours, inputs)
    assert torch.equal(got, want)  # measured on an AVX512-BF16 Xeon: 0.0 either way
    tokens = ours.ask([user_message(PROMPT, 1)], [test_image], SamplingOptions(max_new_tokens=16, temperature=0)).tokens
    assert tokens == greedy_reference(ref, inputs, 16, ours.stop_ids)
    assert len(set(tokens)) >= 8
    for model, prefix in ((ours.model, "decoder."), (ref, "model.language_model.")):
        layouts = {
            n.replace(prefix, "decoder."): bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
            for n, m in model.named_modules()
            if type(m).__name__ == "Linear4bit"
        }
        assert layouts == {n: packed and n not in DOWN_PROJ for n in layouts} and len(layouts) == 14


@pytest.mark.skipif(not NATIVE, reason="the packed kernel (and so the notice) needs a CPU with AVX512-BF16")
def test_cli_notice_once_and_quiet(capsys, llava_ckpt, test_image):
    from vlmcli.cli import main

    code = main(["describe", str(test_image), "-m", str(llava_ckpt), "-b", "int4", "--max-tokens", "2"])
    out, err = capsys.readouterr()
    assert code == 0 and out
    assert err.replace("\n", " ").count("run on bitsandbytes' generic fp32 path") == 1, err
    code = main(["describe", str(test_image), "-m", str(llava_ckpt), "-b", "int4", "--max-tokens", "2", "-q"])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "") and out


def test_bitsandbytes_noise_filtered(caplog):
    """The kernels-community line is logged while bitsandbytes is imported (on AVX512-BF16
    CPUs without the optional `kernels` package): vlm's import shows nothing, in a fresh
    process; and the filter drops that line and the int8 cast notice, nothing else."""
    proc = subprocess.run(
        [sys.executable, "-c", "from backends.bnb import _bnb; _bnb()"], capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    vlm_bnb._bnb()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...", "no kernels"
        )
        logging.getLogger("bitsandbytes.autograd._functions").warning("inputs will be cast from torch.float32 to float16")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
