"""`deskpod serve --speculative-config`: the official `openai` client gets the replies a server without it gives,
streamed several tokens an event when guesses are kept; /metrics counts the guesses under deskpod's and vLLM's
names; a setting deskpod does not know stops the server at once, named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deskpod.engine.llm import LLM
from deskpod.engine.sampler import SamplingParams

CODE = json.loads((Path(__file__).parents[1] / "data" / "code-samples.json").read_text())["merge_sorted"]
MESSAGES = [{"role": "user", "content": "Add type hints to this function and give the whole function back:\n\n" + CODE}]
# another prompt for the stream: the same one would start from the first's cached blocks, and in compact mode
# a prompt computed in pieces may part from one computed whole at a near-tie, guesses or not (README)
STREAMED = [{"role": "user", "content": "Add a docstring to this function and give the whole function back:\n\n" + CODE}]
SPEC = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}'
SMOL = '{model="smollm2"}'


@pytest.fixture(scope="module")
def speculating(serve):
    return serve(["smollm2", "--kv-cache-gb", "0.2", "--ctx", "2048", "--speculative-config", SPEC])


def test_replies_are_those_of_decoding_a_token_a_step(speculating, smollm2_gguf: Path) -> None:
    llm = LLM("smollm2")
    want, want_streamed = (llm.generate(llm.chat_prompt(m), SamplingParams(temperature=0, max_tokens=150))[0]
                           for m in (MESSAGES, STREAMED))
    client = speculating.client()
    reply = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=150, temperature=0)
    assert reply.choices[0].message.content == want.text
    assert reply.usage.completion_tokens == len(want.token_ids)
    want = want_streamed
    stream = client.chat.completions.create(model="smollm2", messages=STREAMED, max_tokens=150, temperature=0,
                                            stream=True, logprobs=True)
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    per_event = [len(c.choices[0].logprobs.content) for c in chunks if c.choices[0].logprobs]
    assert sum(per_event) == len(want.token_ids) and max(per_event) > 1  # kept guesses arrive together
    m = speculating.metrics()
    drafted, accepted = m[f"deskpod_spec_decode_num_draft_tokens_total{SMOL}"], m[f"deskpod_spec_decode_num_accepted_tokens_total{SMOL}"]
    assert drafted > accepted > 20
    assert m['vllm:spec_decode_num_accepted_tokens_total{model_name="smollm2"}'] == accepted


def test_a_setting_it_does_not_know_stops_the_server_named() -> None:
    result = subprocess.run([sys.executable, "-m", "deskpod.server.cli", "smollm2", "--speculative-config",
                             '{"method": "ngram", "draft_tensor_parallel_size": 1}'], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "--speculative-config: unknown key(s) 'draft_tensor_parallel_size'" in result.stderr
