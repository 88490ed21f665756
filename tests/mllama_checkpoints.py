"""Builders for tiny random Llama 3.2 Vision (mllama) checkpoints, written by transformers'
save_pretrained with the processor files the hub repos carry:

    config.json (MllamaConfig), model.safetensors, tokenizer.json (the tiny BPE tokenizer of
    tests/family_checkpoints.py plus Llama 3's header tokens and <|image|> as the last id,
    one past vocab_size as in the hub repos), tokenizer_config.json, chat_template.json and
    preprocessor_config.json (MllamaImageProcessor: 28 px tiles, up to 4, bilinear, CLIP
    statistics).

Tiny sizes: 14 px patches of 28 px tiles (4 patches + class token = 5 positions, padded to
8 in the tower), vision width 32 (4 heads), 4 local blocks (intermediate layers 1 and 3),
2 global blocks; decoder hidden 64, 5 layers of which 1 and 3 cross-attend, llama3 RoPE
scaling. Every parameter is random noise (tests/checkpoints.randomize_weights_): the 1-D
ones around 1, so the tanh gates that transformers initialises at zero (which would hide the
cross-attention and the tile embeddings) are about tanh(1) = 0.76.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.checkpoints import DEFAULT_WEIGHT_SCALE, _transformers_version, _write_json, randomize_weights_
from tests.family_checkpoints import train_chatml_tokenizer

LLAMA_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|finetune_right_pad_id|>"]
IMAGE_TOKEN = "<|image|>"
TILE = 28
MAX_TILES = 4


def train_mllama_tokenizer():
    from tokenizers import AddedToken

    tok = train_chatml_tokenizer()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in LLAMA_SPECIALS])
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)])  # the last id
    return tok


def preprocessor_config(tile: int = TILE, max_tiles: int = MAX_TILES) -> dict:
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "MllamaImageProcessor",
        "max_image_tiles": max_tiles,
        "processor_class": "MllamaProcessor",
        "resample": 2,
        "rescale_factor": 1 / 255,
        "size": {"height": tile, "width": tile},
    }


def tiny_configs(vocab_size: int, ids: dict[str, int]) -> tuple[dict, dict]:
    vision = dict(
        hidden_size=32, attention_heads=4, num_hidden_layers=4, num_global_layers=2, intermediate_size=64,
        intermediate_layers_indices=[1, 3], vision_output_dim=32 * 3, image_size=TILE, patch_size=14,
        max_num_tiles=MAX_TILES, norm_eps=1e-5, hidden_act="gelu",
    )
    text = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=5, cross_attention_layers=[1, 3],
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|eot_id|>"], pad_token_id=ids["<|finetune_right_pad_id|>"],
        tie_word_embeddings=False,
    )
    return vision, text


def make_mllama_checkpoint(
    path, *, seed: int = 0, weight_scale: float = DEFAULT_WEIGHT_SCALE, cross_gates: tuple[float, float] = (0.6, 0.4),
    projector_scale: float = 0.05,
) -> Path:
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    from vlmcli.families.mllama import MLLAMA_CHAT_TEMPLATE

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_mllama_tokenizer()
    ids = {t: tok.token_to_id(t) for t in LLAMA_SPECIALS + [IMAGE_TOKEN]}
    vocab = tok.get_vocab_size() - 1  # <|image|> lies past the vocabulary, in the embedding's extra rows
    assert ids[IMAGE_TOKEN] == vocab
    vision, text = tiny_configs(vocab, ids)
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=ids[IMAGE_TOKEN])
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():
        randomize_weights_(model, weight_scale, seed)
        # The cross-attention gates: noise around 1 (tanh 0.76) lets the same image states
        # swamp every position and greedy decoding repeats one token; these keep the
        # images visible in the logits (the tests check that they matter) and the text too.
        # The tower's output is of order 30 (LayerNorm-ed, then concatenated): the projector
        # brings it near the size of the text's hidden states, as a trained one does.
        model.model.multi_modal_projector.weight.mul_(projector_scale)
        model.model.multi_modal_projector.bias.mul_(projector_scale)
        for layer in model.model.language_model.layers:
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.fill_(cross_gates[0])
                layer.cross_attn_mlp_gate.fill_(cross_gates[1])
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    _write_json(path / "tokenizer_config.json", {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": "<|finetune_right_pad_id|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "extra_special_tokens": {"image_token": IMAGE_TOKEN},
    })
    _write_json(path / "chat_template.json", {"chat_template": MLLAMA_CHAT_TEMPLATE})
    _write_json(path / "preprocessor_config.json", preprocessor_config())
    _write_json(path / "generation_config.json", {
        "bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": ids["<|eot_id|>"],
        "pad_token_id": ids["<|finetune_right_pad_id|>"], "transformers_version": _transformers_version(),
    })
    return path


def reference_processor(path):
    """transformers' MllamaProcessor with the Pillow image processor (no torchvision here)."""
    import json

    import transformers
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    path = Path(path)
    return transformers.MllamaProcessor(
        image_processor=MllamaImageProcessorPil.from_pretrained(path),
        tokenizer=transformers.AutoTokenizer.from_pretrained(path),
        chat_template=json.loads((path / "chat_template.json").read_text())["chat_template"],
    )


def hub_config_11b() -> dict:
    """meta-llama/Llama-3.2-11B-Vision-Instruct's config.json as the hub repo has it (4.45)."""
    return {
        "architectures": ["MllamaForConditionalGeneration"],
        "image_token_index": 128256,
        "model_type": "mllama",
        "text_config": {
            "bos_token_id": 128000, "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38], "dropout": 0,
            "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
            "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
            "model_type": "mllama_text_model", "num_attention_heads": 32, "num_hidden_layers": 40,
            "num_key_value_heads": 8, "pad_token_id": 128004, "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
            "vocab_size": 128256,
        },
        "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0",
        "vision_config": {
            "attention_heads": 16, "hidden_act": "gelu", "hidden_size": 1280, "image_size": 560,
            "initializer_range": 0.02, "intermediate_layers_indices": [3, 7, 15, 23, 30], "intermediate_size": 5120,
            "max_length": 20, "max_num_tiles": 4, "model_type": "mllama_vision_model", "norm_eps": 1e-05,
            "num_channels": 3, "num_global_layers": 8, "num_hidden_layers": 32,
            "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
            "torch_dtype": "bfloat16", "vision_output_dim": 7680,
        },
    }


def hub_config_90b() -> dict:
    """meta-llama/Llama-3.2-90B-Vision-Instruct's: the 11B's tower, a Llama 3.1 70B decoder
    with a cross-attention layer every 5 of its 100."""
    config = hub_config_11b()
    config["text_config"].update(
        cross_attention_layers=list(range(3, 100, 5)), hidden_size=8192, intermediate_size=28672,
        num_attention_heads=64, num_hidden_layers=100, num_key_value_heads=8,
    )
    return config


# The chat template of meta-llama/Llama-3.2-11B-Vision-Instruct (its tokenizer_config.json /
# chat_template.json), as public code that uses it reproduces it: a dated system turn when
# there is no image, <|image|> for image parts, images refused with a system message, tools.
HUB_CHAT_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- Find out if there are any images #}
{% set image_ns = namespace(has_images=false) %}
{%- for message in messages %}
    {%- for content in message['content'] %}
        {%- if content['type'] == 'image' %}
            {%- set image_ns.has_images = true %}
        {%- endif %}
    {%- endfor %}
{%- endfor %}

{#- Error out if there are images and system message #}
{%- if image_ns.has_images and not system_message == "" %}
    {{- raise_exception("Prompting with images is incompatible with system messages.") }}
{%- endif %}

{#- System message if there are no images #}
{%- if not image_ns.has_images %}
    {{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
    {%- if tools is not none %}
        {{- "Environment: ipython\n" }}
    {%- endif %}
    {{- "Cutting Knowledge Date: December 2023\n" }}
    {{- "Today Date: " + date_string + "\n\n" }}
    {%- if tools is not none and not tools_in_user_message %}
        {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
        {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
        {{- "Do not use variables.\n\n" }}
        {%- for t in tools %}
            {{- t | tojson(indent=4) }}
            {{- "\n\n" }}
        {%- endfor %}
    {%- endif %}
    {{- system_message }}
    {{- "<|eot_id|>" }}
{%- endif %}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {%- for content in message['content'] %}
                {%- if content['type'] == 'image' %}
                    {{- '<|image|>' }}
                {%- elif content['type'] == 'text' %}
                    {{- content['text'] }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
