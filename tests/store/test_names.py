"""Model names: what is accepted, what is refused (and the refusal states the rule)."""

from __future__ import annotations

import pytest

from deskpod.errors import InvalidModelName
from deskpod.store import parse_name, sanitize_name


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("smollm2", ("smollm2", "latest")),
        ("smollm2:q4_1", ("smollm2", "q4_1")),
        ("a.b-c_d:1.0", ("a.b-c_d", "1.0")),
        ("0x" + "a" * 62, ("0x" + "a" * 62, "latest")),
    ],
)
def test_valid(ref: str, expected: tuple[str, str]) -> None:
    assert parse_name(ref) == expected


@pytest.mark.parametrize(
    "ref",
    ["", "SmolLM2", "../etc", "/abs", "a/b", "a\\b", "a..b", ".hidden", "-x", "_x", "a" * 65,
     "a:b:c", "a:", ":tag", "a b", "a:../x", "a:" + "t" * 65, "naïve"],
)  # fmt: skip
def test_refused_with_the_rule(ref: str) -> None:
    with pytest.raises(InvalidModelName, match="lower-case letters, digits") as e:
        parse_name(ref)
    assert repr(ref) in str(e.value)


@pytest.mark.parametrize(
    ("stem", "name"),
    [
        ("SmolLM2-135M-Instruct.Q4_1", "smollm2-135m-instruct.q4_1"),
        ("all MiniLM/L6 (v2)", "all-minilm-l6-v2"),
        ("..hidden..model..", "hidden.model"),
        ("___", "model"),
        ("A" * 100, "a" * 64),
    ],
)
def test_sanitize(stem: str, name: str) -> None:
    assert sanitize_name(stem) == name
    parse_name(name)
