"""Tool calls: which format a model writes them in, and reading them out of its reply, whole or streamed.

Models are trained to call tools in their own format, which their chat template shows them:
- hermes (Qwen2.5, Qwen3, Hermes): `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, repeated;
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`;
- llama3_json (Llama 3.1+): the reply is `{"name": ..., "parameters": {...}}` (calls separated by `;`).
Small models often drop the markers and answer with the call's JSON alone (a line per call, sometimes in a
```json fence), as Ollama's parser allows: a reply that is nothing but such calls, naming offered tools, is
read as calls too. With tool_choice "required" or a named function the reply is instead constrained to JSON
(vLLM's way): a list of {"name", "parameters"}, or the named function's arguments alone.

A call that cannot be read (not JSON, no offered tool's name) stays in the reply's text: nothing the model
wrote is dropped.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deskpod.engine.text import held_back


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # JSON text

    @classmethod
    def of(cls, obj: Any) -> Call | None:
        """From {"name": ..., "arguments" (or "parameters"): {...}}; None when `obj` is not a call."""
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        return cls(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def bare_calls(text: str, names: set[str]) -> list[Call] | None:
    """The calls a reply holds when it is nothing but call JSON: one object, a list, or an object per line
    (or separated by `;`), in a ```json fence or not, each naming an offered tool; None otherwise."""
    body = text.strip().removeprefix("<|python_tag|>")
    if body.startswith("```"):
        body = body.removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    whole = _loads(body)
    items = whole if isinstance(whole, list) else [whole] if whole is not None else None
    if items is None:
        pieces = [p for line in body.splitlines() for p in line.split(";") if p.strip()]
        items = [_loads(p.strip()) for p in pieces]
    calls = [Call.of(item) for item in items]
    if not calls or not all(c is not None and c.name in names for c in calls):
        return None
    return calls  # type: ignore[return-value]


class ToolCallReader:
    """Splits a reply, delta by delta, into text and calls. `feed` returns (text to show, calls completed);
    `finish` returns what was held back at the end.

    A reply that opens like JSON is held back whole and read at its end by `bare_calls`; otherwise the text
    goes out as it comes, but for the format's call markers, whose calls are read as each one closes."""

    start: str = ""  # the marker opening a call; "" for formats read only at the end

    def __init__(self, names: set[str]):
        self.names = names
        self.buffer = ""  # text not shown yet: the reply's opening, a marker's beginning, or a call being written
        self.mode = "opening"  # then "text" (showing), "call" (inside a marker's call) or "whole" (held to the end)
        self.calls: list[Call] = []

    def feed(self, delta: str) -> tuple[str, list[Call]]:
        self.buffer += delta
        if self.mode == "opening":
            head = self.buffer.lstrip()
            if not head or (len(head) < 3 and "```".startswith(head)):
                return "", []  # too early to tell
            marker = bool(self.start) and (head.startswith(self.start) or self.start.startswith(head))
            self.mode = "whole" if not marker and head.startswith(("{", "[", "```", "<|python_tag|>")) else "text"
        if self.mode == "whole":
            return "", []
        return self._scan()

    def _scan(self) -> tuple[str, list[Call]]:
        shown, done = "", []
        while True:
            if self.mode == "text":
                at = self.buffer.find(self.start) if self.start else -1
                if at < 0:
                    keep = held_back(self.buffer, (self.start,)) if self.start else 0
                    shown += self.buffer[: len(self.buffer) - keep]
                    self.buffer = self.buffer[len(self.buffer) - keep :]
                    return shown, done
                shown, self.buffer, self.mode = shown + self.buffer[:at], self.buffer[at:], "call"
            taken = self._take()
            if taken is None:
                return shown, done
            calls, text = taken
            self.mode, shown, done = "text", shown + text, done + calls
            self.calls += calls

    def finish(self) -> tuple[str, list[Call]]:
        """The end of the reply: what was held back, read as calls when it is calls, else as text."""
        rest, self.buffer = self.buffer, ""
        calls = bare_calls(rest, self.names) if self.mode in ("whole", "opening") else None
        if calls is None and self.mode == "call":
            calls = self._read_open_call(rest)
        if calls:
            self.calls += calls
            return "", calls
        return rest, []

    def take_reasoning(self) -> str:
        """Reasoning read since the last call, apart from the content (only formats with a channel for it)."""
        return ""

    def _take(self) -> tuple[list[Call], str] | None:
        """A call closed at the start of the buffer, consumed: (its calls, "") or, when it does not read as
        one, ([], its text); None while it is still open."""
        return None

    def _read_open_call(self, rest: str) -> list[Call] | None:
        """A call the reply ended inside of (its closing marker never came)."""
        return None


class HermesReader(ToolCallReader):
    start, end = "<tool_call>", "</tool_call>"

    def _take(self) -> tuple[list[Call], str] | None:
        close = self.buffer.find(self.end)
        if close < 0:
            return None
        whole, self.buffer = self.buffer[: close + len(self.end)], self.buffer[close + len(self.end) :]
        call = Call.of(_loads(whole[len(self.start) : -len(self.end)].strip()))
        return ([call], "") if call else ([], whole)

    def _read_open_call(self, rest: str) -> list[Call] | None:
        call = Call.of(_loads(rest[len(self.start) :].strip()))
        return [call] if call else None


class MistralReader(ToolCallReader):
    """`[TOOL_CALLS]` then a JSON list of calls, read once the reply ends: the list closes only then."""

    start = "[TOOL_CALLS]"

    def _read_open_call(self, rest: str) -> list[Call] | None:
        return bare_calls(rest[len(self.start) :], self.names)


class ForcedReader(ToolCallReader):
    """tool_choice "required" (a JSON list of {"name", "parameters"}) or a named function (its arguments):
    the constrained reply is all calls, read at the end."""

    def __init__(self, names: set[str], function: str | None):
        super().__init__(names)
        self.function, self.mode = function, "whole"

    def finish(self) -> tuple[str, list[Call]]:
        rest, self.buffer = self.buffer, ""
        data = _loads(rest)
        if self.function is not None:
            calls = [Call(self.function, json.dumps(data, ensure_ascii=False))] if isinstance(data, dict) else []
        else:
            calls = [c for c in (Call.of(d) for d in data) if c] if isinstance(data, list) else []
        if not calls:  # cut short (max_tokens) before the JSON closed: what there is, as text
            return rest, []
        self.calls += calls
        return "", calls


def forced_schema(tools: list[dict], function: str | None) -> dict:
    """The JSON schema of a reply forced to call tools: the named function's parameters, or (required) a
    non-empty list of calls of any of the tools."""
    by_name = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object", "properties": {}} for t in tools}
    if function is not None:
        return by_name[function]
    calls = [{"type": "object", "properties": {"name": {"const": name}, "parameters": params},
              "required": ["name", "parameters"], "additionalProperties": False} for name, params in by_name.items()]
    return {"type": "array", "minItems": 1, "items": {"anyOf": calls}}


# --- which format ----------------------------------------------------------------------------------

# marker in the chat template -> the reader of the model's calls
FORMATS: dict[str, Callable[[set[str]], ToolCallReader]] = {
    "<tool_call>": HermesReader,
    "[TOOL_CALLS]": MistralReader,
    "<|python_tag|>": ToolCallReader,  # Llama 3.1+: JSON calls alone, read by bare_calls
}


def reader_for(template: str) -> Callable[[set[str]], ToolCallReader] | None:
    """The reader for the format the chat template teaches; None when it shows none deskpod reads."""
    for marker, make in FORMATS.items():
        if marker in template:
            return make
    if '"parameters"' in template and "ipython" in template:  # Llama 3.1's template without the python tag
        return ToolCallReader
    return None


def markers(template: str) -> list[str]:
    """The tokens of the format that must stay in the decoded text (some tokenizers call them special)."""
    return [m for m in FORMATS if m in template]
