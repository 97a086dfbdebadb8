"""gpt-oss's replies in OpenAI's harmony format, read into reasoning, content and tool calls.

The model writes messages on channels, each `<|channel|>NAME[ to=RECIPIENT][ <|constrain|>TYPE]<|message|>BODY`
ended by `<|end|>` (then `<|start|>assistant` and the next message), `<|return|>` or `<|call|>` (both end the
generation, so they are rarely in the text). The channels:
- `analysis`: its chain of thought, returned as `reasoning_content` (as vLLM does), never mixed into `content`;
- `final`: the answer, `content`;
- `commentary`: with a recipient `to=functions.NAME`, a tool call whose body is the JSON arguments; without
  one, a preamble meant for the user, `content`.
A reply with no channel at all (a model that ignored its format) is all content: nothing it wrote is dropped,
and a call to a function that was not offered stays in the content as written.
"""

from __future__ import annotations

import re

from deskpod.engine.text import held_back
from deskpod.server.openai.chat.tool_calls import Call, ToolCallReader

START, CHANNEL, MESSAGE, CONSTRAIN = "<|start|>", "<|channel|>", "<|message|>", "<|constrain|>"
ENDS = ("<|end|>", "<|return|>", "<|call|>")
MARKERS = (START, CHANNEL, MESSAGE, CONSTRAIN, *ENDS)
_MARKER = re.compile("|".join(re.escape(m) for m in MARKERS))
_CHANNEL = re.compile(re.escape(CHANNEL) + r"\s*([^\s<]+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
FUNCTIONS = "functions."


def speaks_harmony(template: str) -> bool:
    """Whether a chat template teaches the harmony format (gpt-oss's own does)."""
    return CHANNEL in template and MESSAGE in template


class HarmonyReader(ToolCallReader):
    """`feed` / `finish` give (content to show, calls completed) as every ToolCallReader does; the reasoning
    read meanwhile is collected by `take_reasoning()`."""

    def __init__(self, names: set[str]):
        super().__init__(names)
        self.mode = "header"  # "header": reading a message's channel and recipient; "body": its text
        self.header = ""
        self.channel, self.recipient = "", ""
        self.call_body = ""  # a tool call's arguments, read whole
        self.reasoning = ""  # not yet taken
        self.saw_channel = False

    def feed(self, delta: str) -> tuple[str, list[Call]]:
        self.buffer += delta
        return self._scan(final=False)

    def finish(self) -> tuple[str, list[Call]]:
        shown, calls = self._scan(final=True)
        if self.mode == "body":  # the generation ended inside a message (`<|call|>` / `<|return|>` are its end)
            text, more = self._close()
            shown, calls = shown + text, calls + more
        elif not self.saw_channel:  # no harmony at all: what the model wrote is the answer
            shown, self.header = shown + self.header, ""
        return shown, calls

    def take_reasoning(self) -> str:
        taken, self.reasoning = self.reasoning, ""
        return taken

    def _scan(self, final: bool) -> tuple[str, list[Call]]:
        shown, calls = "", []
        while True:
            found = _MARKER.search(self.buffer)
            if found is None:
                keep = 0 if final else held_back(self.buffer, MARKERS)
                piece, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep :]
                shown += self._text(piece)
                return shown, calls
            piece, marker, self.buffer = self.buffer[: found.start()], found.group(), self.buffer[found.end() :]
            shown += self._text(piece)
            if self.mode == "header":
                self.header += marker
                if marker == MESSAGE:
                    self._open()
                continue
            # in a body: an end marker closes the message; any other marker starts the next one's header
            text, more = self._close()
            shown, calls = shown + text, calls + more
            self.mode, self.header = "header", "" if marker in ENDS else marker

    def _text(self, piece: str) -> str:
        """Text inside the current section: shown (content), kept as reasoning, or kept as a call's arguments."""
        if self.mode == "header":
            self.header += piece
            return ""
        if self.recipient:
            self.call_body += piece
            return ""
        if self.channel == "analysis":
            self.reasoning += piece
            return ""
        return piece

    def _open(self) -> None:
        channel, recipient = _CHANNEL.search(self.header), _RECIPIENT.search(self.header)
        self.saw_channel = self.saw_channel or channel is not None
        self.channel = channel[1] if channel else ""
        self.recipient = recipient[1] if recipient else ""
        self.mode, self.call_body = "body", ""

    def _close(self) -> tuple[str, list[Call]]:
        """The message ends: a tool call is read (a call to a function not offered is shown as it was written)."""
        if not self.recipient:
            return "", []
        name, body = self.recipient.removeprefix(FUNCTIONS), self.call_body.strip()
        self.recipient, self.call_body = "", ""
        if name in self.names:
            call = Call(name, body or "{}")
            self.calls.append(call)
            return "", [call]
        return f"{self.header}{body}", []
