"""ChatSession: multi-turn answers equal a fresh full recompute, and the cached prefix is
actually reused rather than recomputed."""

from __future__ import annotations

import json

import pytest

from vlmcli.chat import ChatSession
from vlmcli.errors import ContextLengthError, ImageError
from vlmcli.generate import SamplingOptions
from vlmcli.inputs import ImageInput
from vlmcli.pipeline import Pipeline


@pytest.fixture(scope="module")
def pipe(llava_ckpt):
    return Pipeline.load(str(llava_ckpt), "cpu")


def fresh(pipe, session):
    """What a stateless run over the same conversation (minus the last reply) generates."""
    return pipe.ask(session.messages[:-1], session.images, session.opts)


def test_turns_equal_a_fresh_recompute_and_reuse_the_prefix(pipe, make_test_image):
    session = ChatSession(pipe, SamplingOptions(max_new_tokens=12, repetition_penalty=1.3))
    session.add_image(make_test_image(seed=1))
    first = session.ask("What is in this picture?")
    assert first.reused_tokens == 0
    assert first.tokens == fresh(pipe, session).tokens and len(first.tokens) == 12

    second = session.ask("And the colours?")  # no image: the first one stays in context
    assert second.tokens == fresh(pipe, session).tokens
    # at least the first turn's prompt came from the cache (this random model's byte soup
    # may re-tokenize differently, so its reply is not always reused in full)
    assert second.reused_tokens >= first.prompt_tokens

    session.add_image(make_test_image(size=(40, 70), seed=2))  # a picture mid-conversation
    third = session.ask("Compare the two pictures.")
    assert third.tokens == fresh(pipe, session).tokens
    assert third.reused_tokens >= second.prompt_tokens
    assert third.prompt_tokens - third.reused_tokens >= 25  # the new image's tokens were prefilled
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 3
    assert session.cached_tokens == third.prompt_tokens + len(third.tokens) - 1  # the last token is never fed


def test_sampling_with_a_seed_matches_too(pipe):
    opts = SamplingOptions(max_new_tokens=10, temperature=0.9, top_k=40, top_p=0.9, seed=7)
    session = ChatSession(pipe, opts)
    session.ask("A small red fox runs.")
    reply = session.ask("The sky is pale blue.")
    assert reply.tokens == fresh(pipe, session).tokens


def test_streamed_text_is_the_reply(pipe):
    session = ChatSession(pipe, SamplingOptions(max_new_tokens=15))
    pieces = []
    reply = session.ask("Describe the image in detail.", on_text=pieces.append)
    assert "".join(pieces) == reply.text == pipe.tokenizer.decode(reply.tokens)


def test_clear_forgets_everything(pipe, test_image):
    session = ChatSession(pipe, SamplingOptions(max_new_tokens=5))
    session.add_image(test_image)
    session.ask("What is this?")
    session.clear()
    assert session.messages == [] and session.images == [] and session.cached_tokens == 0
    reply = session.ask("What is this?")
    assert reply.reused_tokens == 0 and reply.tokens == fresh(pipe, session).tokens


def test_ctrl_c_keeps_the_conversation(pipe, test_image):
    session = ChatSession(pipe, SamplingOptions(max_new_tokens=30))
    session.ask("Hello.")
    session.add_image(test_image)
    seen = []

    def stop_after_three(text):
        seen.append(text)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.ask("Describe the picture.", on_text=stop_after_three)
    # the question and the partial reply are kept, and the image went with the question
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    partial = session.messages[-1]["content"][0]["text"]
    assert partial and partial.startswith("".join(seen[:3]))
    assert session.pending_images == []
    # the next turn is still exactly what a fresh run gives
    reply = session.ask("Go on.")
    assert reply.tokens == fresh(pipe, session).tokens


def test_ctrl_c_before_any_token_drops_the_question(pipe, test_image, monkeypatch):
    session = ChatSession(pipe, SamplingOptions(max_new_tokens=5))
    session.ask("Hello.")
    session.add_image(test_image)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("vlmcli.chat.generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        session.ask("Describe the picture.")
    monkeypatch.undo()
    assert len(session.messages) == 2 and len(session.pending_images) == 1
    reply = session.ask("Describe the picture.")
    assert reply.tokens == fresh(pipe, session).tokens


def test_running_out_of_context_is_said(llava_ckpt):
    pipe = Pipeline.load(str(llava_ckpt), "cpu")
    pipe.stop_ids = set()  # so that only the context can end this reply
    session = ChatSession(pipe, SamplingOptions(max_new_tokens=1000))
    reply = session.ask("A small red fox runs across the green field at dawn. " * 17)
    assert reply.prompt_tokens > 400  # a long prompt, so that few tokens fill the rest
    assert reply.finish_reason == "context"
    assert reply.prompt_tokens + len(reply.tokens) == session.context_length + 1  # the last one is not fed back
    assert session.cached_tokens == session.context_length == 512
    n = len(session.messages)
    with pytest.raises(ContextLengthError) as e:
        session.ask("What next?")
    assert str(e.value).startswith("the conversation no longer fits the model's context: the prompt is ")
    assert str(e.value).endswith("but the model's context is 512 tokens (/clear starts a new conversation)")
    assert len(session.messages) == n  # the failed turn added nothing
    session.clear()
    assert session.ask("What next?").reused_tokens == 0


def test_bad_image_fails_when_added(pipe, tmp_path):
    (tmp_path / "x.png").write_bytes(b"not a picture")
    session = ChatSession(pipe)
    with pytest.raises(ImageError, match="cannot read image '.*x.png': not an image"):
        session.add_image(tmp_path / "x.png")
    assert session.images == []


def test_transcript_names_images_by_path(pipe, test_image, tmp_path, monkeypatch):
    monkeypatch.chdir(test_image.parent)
    session = ChatSession(pipe, SamplingOptions(max_new_tokens=4))
    session.add_image(ImageInput(test_image.name, test_image.relative_to(test_image.parent)))
    reply = session.ask("What is this?")
    session.add_image(test_image)
    path = session.save(tmp_path / "chat.json")
    assert json.loads(path.read_text()) == {
        "model": pipe.model_ref,
        "options": {
            "max_new_tokens": 4,
            "temperature": 0.0,
            "top_k": 0,
            "top_p": 1.0,
            "repetition_penalty": 1.0,
            "seed": None,
        },
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "image": str(test_image)}, {"type": "text", "text": "What is this?"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": reply.text}]},
        ],
        "pending_images": [str(test_image)],
    }


@pytest.mark.slow
def test_real_model_remembers_earlier_turns(smollm2_llava):
    pipe = Pipeline.load(str(smollm2_llava), "cpu")
    session = ChatSession(pipe, SamplingOptions(max_new_tokens=20))
    first = session.ask("What is the capital of France?")
    assert first.text == "The capital of France is Paris." and first.finish_reason == "stop"
    # "And of Germany?" only makes sense with the first turn in context
    second = session.ask("And of Germany?")
    assert second.text == "The capital of Germany is Berlin."
    assert second.tokens == fresh(pipe, session).tokens
    # the whole first turn, question and reply, came from the cache: only the new message
    # (from the reply's <|im_end|> on) was prefilled
    assert second.reused_tokens == first.prompt_tokens + len(first.tokens)
    assert second.prompt_tokens - second.reused_tokens == len(
        pipe.tokenizer.encode("<|im_end|>\n<|im_start|>user\nAnd of Germany?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    )
