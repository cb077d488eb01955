"""Tool calls in a Kimi assistant reply, as the OpenAI API returns them.

The chat format (``tokenizer.KIMI_CHAT_TEMPLATE``) puts an assistant's tool calls after its text:
``<|tool_calls_section_begin|>`` then, per call, ``<|tool_call_begin|>{id}<|tool_call_argument_begin|>{arguments}
<|tool_call_end|>``, then ``<|tool_calls_section_end|>``; the id is ``functions.{name}:{index}``. The markers are
tokens that decoding keeps in the text, so the calls are parsed from the text.

``ToolCallParser`` takes the reply's text piece by piece (as it streams) and splits it into the content before
the section, which it passes on as soon as it cannot be the start of a marker, and the calls, each given out
once it is complete. A reply whose section never completes a call keeps that text as content: nothing the model
wrote is dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL = re.compile(r"<\|tool_call_begin\|>\s*(?P<id>.*?)\s*<\|tool_call_argument_begin\|>(?P<arguments>.*?)"
                  r"<\|tool_call_end\|>", re.DOTALL)
CALL_ID = re.compile(r"^(?:functions\.)?(?P<name>.+?)(?::\d+)?$")


@dataclass(frozen=True)
class ToolCall:
    """One call: ``id`` as the model wrote it, the function's ``name`` and its ``arguments`` (a JSON text, as
    written: the API passes it on unparsed, as OpenAI's does)."""

    id: str
    name: str
    arguments: str

    def openai(self, index: int) -> dict:
        """The call as an entry of ``message.tool_calls`` (``index`` for a streamed delta)."""
        return {"index": index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker`` (0 if none)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """``feed(text)`` -> ``(content, calls)``: the content that is safe to send and the calls completed by this
    piece. ``finish()`` -> the same for the end of the reply (held-back content, an unfinished section as
    content). ``calls`` counts every call given out."""

    def __init__(self):
        self.buffer = ""
        self.in_section = False
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self.buffer += text
        content = ""
        if not self.in_section:
            at = self.buffer.find(SECTION_BEGIN)
            if at < 0:
                keep = _partial_suffix(self.buffer, SECTION_BEGIN)
                content, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep :]
                return content, []
            content, self.buffer = self.buffer[:at], self.buffer[at + len(SECTION_BEGIN) :]
            self.in_section = True
        calls = []
        while (m := CALL.search(self.buffer)) is not None:
            call_id = m.group("id")
            name = CALL_ID.match(call_id).group("name") if call_id else ""
            calls.append(ToolCall(call_id, name, m.group("arguments").strip()))
            self.buffer = self.buffer[m.end() :]
        self.calls += len(calls)
        return content, calls

    def finish(self) -> str:
        """The text left at the end of the reply that is content: what was held back before a section, or an
        unfinished call's text. A finished section's end marker (and whatever follows it) is dropped."""
        rest, self.buffer = self.buffer, ""
        if not self.in_section:
            return rest
        rest = rest.split(SECTION_END, 1)[0]
        if self.calls and not rest.strip():
            return ""
        return rest if self.calls else SECTION_BEGIN + rest
