"""gpt-oss's harmony replies read into reasoning_content, content and tool calls: whole, streamed a character at a
time (the same result), and through the chat route's response builders."""

from __future__ import annotations

import pytest

from deskpod.server.openai.chat.harmony import HarmonyReader, speaks_harmony
from deskpod.server.openai.chat.tool_calls import Call

THINK_THEN_ANSWER = ("<|channel|>analysis<|message|>The user greets; answer briefly.<|end|>"
                     "<|start|>assistant<|channel|>final<|message|>Hello! How can I help?")
CALL = ("<|channel|>analysis<|message|>Need the weather tool.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        '{"city": "Paris"}')


def read(text: str, names=frozenset({"get_weather"}), step: int | None = None) -> tuple[str, str, list[Call]]:
    """(content, reasoning, calls) of a reply fed whole, or `step` characters at a time."""
    reader = HarmonyReader(set(names))
    content, reasoning, calls = "", "", []
    pieces = [text] if step is None else [text[i : i + step] for i in range(0, len(text), step)]
    for piece in pieces:
        shown, done = reader.feed(piece)
        content, reasoning, calls = content + shown, reasoning + reader.take_reasoning(), calls + done
    shown, done = reader.finish()
    return content + shown, reasoning + reader.take_reasoning(), calls + done


@pytest.mark.parametrize("step", [None, 1, 3])
def test_thinking_and_answer_are_apart(step):
    assert read(THINK_THEN_ANSWER, step=step) == ("Hello! How can I help?", "The user greets; answer briefly.", [])


@pytest.mark.parametrize("step", [None, 1])
def test_a_call_on_the_commentary_channel(step):
    content, reasoning, calls = read(CALL, step=step)  # the generation ended at <|call|>, an end token
    assert (content, reasoning) == ("", "Need the weather tool.")
    assert calls == [Call("get_weather", '{"city": "Paris"}')]
    assert read(CALL + "<|call|>", step=step)[2] == calls  # with the end token kept in the text too


def test_what_is_not_reasoning_or_an_offered_call_stays_in_the_content():
    assert read("no channels at all") == ("no channels at all", "", [])
    preamble = "<|channel|>commentary<|message|>Let me check.<|end|><|start|>assistant<|channel|>final<|message|>Done."
    assert read(preamble) == ("Let me check.Done.", "", [])
    content, _, calls = read(CALL, names={"other"})
    assert calls == [] and '{"city": "Paris"}' in content and "to=functions.get_weather" in content
    # cut off while thinking (max_tokens): reasoning only, no content
    assert read("<|channel|>analysis<|message|>Hmm, let me") == ("", "Hmm, let me", [])


def test_harmony_is_recognised_by_its_template():
    assert speaks_harmony("{{ '<|start|>assistant<|channel|>final<|message|>' }}")
    assert not speaks_harmony("{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}")
