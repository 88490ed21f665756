"""Image settings as current transformers saves them: inside processor_config.json (under
"image_processor"), with no preprocessor_config.json. A checkpoint whose settings differ
from the family's defaults must get the reference's pixels and tokens, not the defaults'."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlmcli.families.llava.processor import image_processor_defaults  # noqa: E402
from vlmcli.generate import SamplingOptions, Timings  # noqa: E402
from vlmcli.pipeline import Pipeline  # noqa: E402
from vlmcli.preprocess import ImageProcessorConfig, preprocess_batch  # noqa: E402
from vlmcli.sequence import user_message  # noqa: E402

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def saved_by_current_transformers(make_llava, tmp_path_factory):
    """The tiny LLaVA with non-default image settings (other mean/std, bilinear, a plain
    resize instead of shortest edge + crop), its processor saved by transformers itself."""
    folder = tmp_path_factory.mktemp("processor-config") / "model"
    shutil.copytree(make_llava(), folder)
    processor = transformers.AutoProcessor.from_pretrained(folder)
    (folder / "preprocessor_config.json").unlink()
    image = processor.image_processor
    image.image_mean, image.image_std = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]
    image.resample = 2  # bilinear
    image.do_center_crop = False
    image.size = {"height": 30, "width": 30}
    processor.save_pretrained(folder)
    assert not (folder / "preprocessor_config.json").exists()
    assert json.loads((folder / "processor_config.json").read_text())["image_processor"]["resample"] == 2
    return folder


def test_settings_come_from_processor_config(saved_by_current_transformers, test_image):
    notices: list[str] = []
    pipe = Pipeline.load(str(saved_by_current_transformers), "cpu", notice=notices.append)
    assert not any("preprocessor_config" in n for n in notices)  # nothing fell back to defaults
    cfg = pipe.image_config
    assert (cfg.image_mean, cfg.image_std, cfg.resample) == ((0.3, 0.4, 0.5), (0.2, 0.25, 0.3), 2)
    assert (cfg.do_center_crop, cfg.size) == (False, (30, 30))


def test_pixels_and_tokens_equal_transformers(saved_by_current_transformers, test_image):
    from PIL import Image

    folder = saved_by_current_transformers
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    messages = [user_message("What is in the picture?", 1)]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=[Image.open(test_image).convert("RGB")], return_tensors="pt")

    pipe = Pipeline.load(str(folder), "cpu")
    ours = pipe.prepare_images([test_image], Timings())
    assert torch.equal(ours.pixels, inputs["pixel_values"])  # bit-identical
    # the family defaults (CLIP mean/std, bicubic, crop) give other pixels: the test can fail
    defaults = ImageProcessorConfig.from_dict(image_processor_defaults(pipe.config))
    image = Image.open(test_image).convert("RGB")
    assert preprocess_batch([image], defaults).shape == inputs["pixel_values"].shape
    assert not torch.equal(preprocess_batch([image], defaults), inputs["pixel_values"])

    with torch.inference_mode():
        want = ref.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    got = pipe.describe([test_image], "What is in the picture?", SamplingOptions(max_new_tokens=NEW_TOKENS))
    want = [t for t in want.tolist() if t not in pipe.stop_ids]
    assert got.tokens == want[: len(got.tokens)] and len(got.tokens) == len(want)
    assert len(set(got.tokens)) >= 4
