"""The decode step under torch.compile: the same greedy tokens as eager, and one graph for
every token (the cache slot is a tensor, the cache is written in place, shapes are fixed by
the cache's length), counted with dynamo's own counters."""

from __future__ import annotations

import pytest

from vlmcli.generate import SamplingOptions
from vlmcli.pipeline import Pipeline

pytestmark = pytest.mark.slow  # inductor compiles C++ for the step (~10 s on 2 cores)

GREEDY = SamplingOptions(max_new_tokens=24)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_compiled_step_gives_eager_tokens_without_recompiling(llava_ckpt, test_image):
    import torch._dynamo

    torch._dynamo.reset()
    pipe = Pipeline.load(str(llava_ckpt), "cpu")
    pipe.stop_ids = set()  # all 24 tokens, so that every step runs
    eager = pipe.describe([test_image], "Describe this image.", GREEDY)
    assert pipe.compile_step()
    before = _graphs()
    compiled = pipe.describe([test_image], "Describe this image.", GREEDY)
    assert compiled.tokens == eager.tokens
    assert len(set(eager.tokens)) >= 8  # the test would notice a wrong step
    assert _graphs() - before == 1  # 23 decode steps, one graph
    assert pipe.step.compiles == 1
    # the same prompt again: the same cache length, nothing compiled
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = pipe.describe([test_image], "Describe this image.", GREEDY)
    assert again.tokens == eager.tokens and _graphs() - before == 1
    # another prompt length is another cache length: one graph more, then reused
    eager2 = Pipeline.load(str(llava_ckpt), "cpu").describe([test_image], "What?", GREEDY).tokens
    assert pipe.describe([test_image], "What?", GREEDY).tokens[: len(eager2)] == eager2
    assert _graphs() - before == 2 and pipe.step.compiles == 2


def test_dynamic_rope_is_not_compiled(make_llava):
    # dynamic NTK RoPE recomputes its tables on the host past the trained length
    import json
    import shutil
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp()) / "m"
    shutil.copytree(make_llava(), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    pipe = Pipeline.load(str(folder), "cpu")
    assert pipe.compile_step() is False and pipe.step is None
