"""Model names: `name[:tag]`, checked so that no name can reach outside the store."""

from __future__ import annotations

import re

from deskpod.errors import InvalidModelName

DEFAULT_TAG = "latest"
MAX_LENGTH = 64
RULE = (
    "a model name is name[:tag]; each part is 1-64 characters of lower-case letters, digits, "
    "'.', '-' and '_', starts with a letter or digit, and contains no '..' (so no '/', "
    "no absolute paths)"
)
_PART = re.compile(r"[a-z0-9][a-z0-9._-]*")
_INVALID_RUN = re.compile(r"[^a-z0-9._-]+")


def _valid_part(part: str) -> bool:
    return len(part) <= MAX_LENGTH and _PART.fullmatch(part) is not None and ".." not in part


def parse_name(ref: str) -> tuple[str, str]:
    """Split `name[:tag]` into (name, tag), tag defaulting to 'latest'; InvalidModelName otherwise."""
    name, _, tag = ref.partition(":")
    tag = tag if ":" in ref else DEFAULT_TAG
    if not (_valid_part(name) and _valid_part(tag)):
        raise InvalidModelName(f"invalid model name {ref!r}: {RULE}")
    return name, tag


def format_ref(name: str, tag: str) -> str:
    return f"{name}:{tag}"


def sanitize_name(text: str) -> str:
    """Turn a file or folder stem into a valid model name ('SmolLM2-135M.Q4_1' -> 'smollm2-135m.q4_1')."""
    name = _INVALID_RUN.sub("-", text.lower())
    name = re.sub(r"\.{2,}", ".", name)
    name = name.lstrip("._-")[:MAX_LENGTH].rstrip("._-")
    return name or "model"
