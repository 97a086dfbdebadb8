"""Chat templates rendered the way transformers renders them, inside Jinja's sandbox.

A chat template comes from the model file, so it is untrusted code: the immutable sandbox stops it from
reaching Python internals or mutating the objects we pass in.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from deskpod.errors import DeskpodError

# The ChatML template, for models whose file carries none.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(DeskpodError):
    pass


def _raise(message: str):
    raise ChatTemplateError(f"chat template: {message}")


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


# A prompt is text for a context window: nothing a template builds needs to be larger than this.
MAX_RENDERED_ITEMS = 1 << 20


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, plus a cap on `*` and `**`, which can otherwise build gigabyte strings
    or numbers with billions of digits from a one-line template."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise SecurityError(f"exponent {right} is too large for a chat template")
        if operator == "*":
            length, count = next(((len(a), b) for a, b in ((left, right), (right, left)) if isinstance(a, (str, list, tuple)) and isinstance(b, int)), (0, 0))
            if length * count > MAX_RENDERED_ITEMS:
                raise SecurityError(f"a chat template tried to build a sequence of {length * count:,} items")
        return super().call_binop(context, operator, left, right)


@lru_cache(maxsize=16)
def _compile(source: str):
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ChatTemplateError(f"the model's chat template does not compile: {e}") from None


def render_chat(
    template: str | None,
    messages: list[dict],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    **variables,
) -> str:
    """The prompt text for `messages` (a list of {"role", "content"} dicts); `variables` are more of the
    template's inputs, as transformers passes them (tools, documents, enable_thinking...)."""
    try:
        return _compile(template or CHATML).render(
            **variables,
            messages=messages,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
        )
    except ChatTemplateError:
        raise
    except Exception as e:  # a template can fail on any input; say so instead of crashing the caller
        raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None


PROBE_TOOL = {"type": "function", "function": {"name": "deskpod_probe_tool", "description": "probe",
                                               "parameters": {"type": "object", "properties": {}}}}


@lru_cache(maxsize=16)
def renders_tools(template: str) -> bool:
    """Whether the template shows the model the tools it is given (many render only the messages)."""
    try:
        text = render_chat(template, [{"role": "user", "content": "hi"}], tools=[PROBE_TOOL])
    except ChatTemplateError:
        return False
    return PROBE_TOOL["function"]["name"] in text
