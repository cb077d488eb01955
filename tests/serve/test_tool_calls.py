"""The tool-call parser of the server's chat endpoint: the calls and the content of a Kimi reply, however the
reply's text is split into streamed pieces."""

from __future__ import annotations

import random

from kimi_linear.serve.tool_calls import SECTION_BEGIN, ToolCall, ToolCallParser

CALLS = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
         '{"city": "Paris"}<|tool_call_end|><|tool_call_begin|> functions.get_time:1 <|tool_call_argument_begin|>'
         '{}<|tool_call_end|><|tool_calls_section_end|>')
END = "<|tool_call_end|>"
WANT = [ToolCall("functions.get_weather:0", "get_weather", '{"city": "Paris"}'),
        ToolCall("functions.get_time:1", "get_time", "{}")]


def parse(pieces: list[str]) -> tuple[str, list[ToolCall]]:
    parser, content, calls = ToolCallParser(), "", []
    for piece in pieces:
        text, new = parser.feed(piece)
        content += text
        calls += new
    return content + parser.finish(), calls


def splits(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 12))))
    return [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def test_calls_and_content_whatever_the_pieces():
    rng = random.Random(0)
    for text, want in [
        ("Let me look. " + CALLS, ("Let me look. ", WANT)),
        (CALLS, ("", WANT)),
        ("no tools here, only a < and a <|tool", ("no tools here, only a < and a <|tool", [])),
        ("cut short " + CALLS[:120], ("cut short " + CALLS[:120], [])),  # no call completed: kept as text
        ("one done " + CALLS[:180], ("one done " + CALLS[CALLS.index(END) + len(END) : 180], WANT[:1])),
    ]:
        for _ in range(200):
            assert parse(splits(text, rng)) == want, text


def test_content_streams_before_the_section_and_a_partial_marker_waits():
    parser = ToolCallParser()
    assert parser.feed("Hello <|tool_calls") == ("Hello ", [])
    assert parser.feed("_section_begin|>") == ("", [])
    content, calls = parser.feed(CALLS[len(SECTION_BEGIN) :])
    assert content == "" and calls == WANT and parser.calls == 2
    assert WANT[0].openai(0) == {"index": 0, "id": "functions.get_weather:0", "type": "function",
                                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
