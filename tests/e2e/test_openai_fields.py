"""Every request field of the OpenAI, vLLM and llama-server APIs that deskpod honours, with its effect
checked on the real SmolLM2 through the official `openai` client: the server's reply equals the engine's own
with the same settings, and differs from the reply without them. Fields deskpod does not implement are
refused with a 400 naming them; fields nobody defines are logged.

The server runs the float32 weights (`--weights float32`), whose replies do not depend on what else runs or
what the prefix cache holds: the compact kernels round activations to int8, so a cached prefix or a
neighbour in the batch can flip a near-tie, and exact equality with the engine would be luck."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import jsonschema
import openai
import pydantic
import pytest

from deskpod.engine.llm import LLM
from deskpod.engine.sampler import SamplingParams
from deskpod.server.openai.fields import NOT_IMPLEMENTED

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The three primary colours are"
GREEDY = SamplingParams(temperature=0, max_tokens=16)
REPEATING = [{"role": "user", "content": "Name ten animals, one per line."}]  # SmolLM2 repeats itself here


@pytest.fixture(scope="module")
def llm(smollm2_gguf: Path) -> LLM:
    return LLM("smollm2", weights="float32")


@pytest.fixture(scope="module")
def server(serve):
    return serve(["smollm2", "--weights", "float32", "--kv-cache-gb", "0.5"], api_key="fields-key")


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client(max_retries=0)


def engine(llm: LLM, ids: list[int], params: SamplingParams = GREEDY, **changes):
    return llm.generate(ids, replace(params, **changes))[0]


def chat(client: openai.OpenAI, messages=QUESTION, **fields):
    """A chat reply; fields outside the client's signature travel in extra_body, as users send them."""
    known = {"max_tokens", "temperature", "seed", "n", "stop", "logit_bias", "logprobs", "top_logprobs",
             "presence_penalty", "frequency_penalty", "response_format", "tools", "tool_choice", "stream",
             "max_completion_tokens", "parallel_tool_calls"}
    extra = {k: fields.pop(k) for k in list(fields) if k not in known}
    return client.chat.completions.create(model="smollm2", messages=messages, **fields, extra_body=extra or None)


# --- sampling fields: the engine's effect, through the server --------------------------------------------


@pytest.mark.parametrize(
    ("fields", "changes"),
    [
        ({"presence_penalty": 1.5}, {"presence_penalty": 1.5}),
        ({"frequency_penalty": 1.5}, {"frequency_penalty": 1.5}),
        ({"repetition_penalty": 1.5}, {"repetition_penalty": 1.5}),
        ({"repeat_penalty": 1.5, "repeat_last_n": 8}, {"repetition_penalty": 1.5, "penalty_window": 8}),  # llama-server
        ({"min_p": 0.3, "temperature": 1.0, "seed": 11}, {"min_p": 0.3, "temperature": 1.0, "seed": 11}),
        ({"top_k": 3, "temperature": 1.0, "seed": 11}, {"top_k": 3, "temperature": 1.0, "seed": 11}),
    ],
    ids=["presence_penalty", "frequency_penalty", "repetition_penalty", "repeat_penalty", "min_p", "top_k"],
)
def test_sampling_fields_act_as_in_the_engine(client, llm, fields, changes):
    ids = llm.chat_prompt(REPEATING)
    want = engine(llm, ids, max_tokens=30, ignore_eos=True, **changes)
    reply = chat(client, REPEATING, max_tokens=30, ignore_eos=True, **{"temperature": 0, **fields})
    assert reply.choices[0].message.content == want.text
    if fields.get("temperature", 0) == 0:
        assert want.text != engine(llm, ids, max_tokens=30, ignore_eos=True).text  # the field changed the reply


def test_logit_bias_bans_and_forces_tokens(client, llm):
    ids = llm.chat_prompt(QUESTION)
    plain = engine(llm, ids)
    banned = plain.token_ids[0]
    reply = chat(client, max_tokens=16, temperature=0, logit_bias={str(banned): -100})
    assert reply.choices[0].message.content == engine(llm, ids, logit_bias={banned: -100}).text
    assert not reply.choices[0].message.content.startswith(llm.tokenizer.decode([banned]))
    forced = llm.tokenizer.encode(" Rome")[0]
    reply = chat(client, max_tokens=1, temperature=0, logit_bias={str(forced): 100})
    assert reply.choices[0].message.content == llm.tokenizer.decode([forced])


def test_allowed_token_ids_limit_the_reply(client, llm):
    allowed = sorted(set(llm.tokenizer.encode(" yes no maybe Yes No")))
    reply = chat(client, max_tokens=6, temperature=0, allowed_token_ids=allowed, logprobs=True)
    assert {llm.tokenizer.encode(t.token)[0] for t in reply.choices[0].logprobs.content} <= set(allowed)


def test_min_tokens_and_stop_token_ids(client, llm):
    hello = [{"role": "user", "content": "Say hello."}]
    ids = llm.chat_prompt(hello)
    plain = engine(llm, ids, max_tokens=64)
    assert plain.finish_reason == "stop"
    reply = chat(client, hello, max_tokens=64, temperature=0, min_tokens=len(plain.token_ids) + 4)
    assert reply.usage.completion_tokens >= len(plain.token_ids) + 4
    stop = plain.token_ids[3]
    cut = chat(client, hello, max_tokens=64, temperature=0, stop_token_ids=[stop])
    assert cut.choices[0].message.content == llm.tokenizer.decode(plain.token_ids[:3])
    assert cut.choices[0].finish_reason == "stop"
    kept = chat(client, hello, max_tokens=64, temperature=0, stop_token_ids=[stop], include_stop_str_in_output=True)
    assert kept.choices[0].message.content == llm.tokenizer.decode(plain.token_ids[:4])


def test_include_stop_str_in_output(client, llm):
    want = engine(llm, llm.prompt_ids(PROMPT), stop=(",",), include_stop_str_in_output=True)
    reply = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=16, temperature=0, stop=",",
                                      extra_body={"include_stop_str_in_output": True})
    assert reply.choices[0].text == want.text and want.text.endswith(",")


def test_skip_special_tokens(client, llm):
    special = llm.tokenizer.special.bos_id if llm.tokenizer.special.bos_id is not None else 1
    force = {"logit_bias": {str(special): 100}, "max_tokens": 1, "temperature": 0, "ignore_eos": True}
    assert chat(client, **force).choices[0].message.content == ""
    shown = chat(client, skip_special_tokens=False, **force).choices[0].message.content
    assert shown == llm.tokenizer.token_text(special) != ""


# --- lengths, prompts and choices -------------------------------------------------------------------------


def test_max_completion_tokens_on_both_routes(client):
    assert chat(client, max_completion_tokens=5, temperature=0, ignore_eos=True).usage.completion_tokens == 5
    reply = client.completions.create(model="smollm2", prompt=PROMPT, temperature=0,
                                      extra_body={"max_completion_tokens": 5, "ignore_eos": True})
    assert reply.usage.completion_tokens == 5
    reply = client.completions.create(model="smollm2", prompt=PROMPT, temperature=0, extra_body={"n_predict": 4, "ignore_eos": True})
    assert reply.usage.completion_tokens == 4  # llama-server's name


def test_n_choices(client, llm):
    greedy = chat(client, max_tokens=8, temperature=0, n=3)
    want = engine(llm, llm.chat_prompt(QUESTION), max_tokens=8).text
    assert [c.index for c in greedy.choices] == [0, 1, 2] and {c.message.content for c in greedy.choices} == {want}
    assert greedy.usage.prompt_tokens == len(llm.chat_prompt(QUESTION))  # the prompt counted once
    assert greedy.usage.completion_tokens == sum(len(engine(llm, llm.chat_prompt(QUESTION), max_tokens=8).token_ids) for _ in range(3))
    sampled = chat(client, max_tokens=12, temperature=1.2, seed=5, n=3, ignore_eos=True)
    texts = [c.message.content for c in sampled.choices]
    assert len(set(texts)) == 3  # each choice its own stream (seed + index)
    assert texts == [c.message.content for c in chat(client, max_tokens=12, temperature=1.2, seed=5, n=3, ignore_eos=True).choices]


def test_n_choices_streamed(client):
    stream = chat(client, max_tokens=6, temperature=1.0, seed=2, n=2, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    texts = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    reply = chat(client, max_tokens=6, temperature=1.0, seed=2, n=2)
    assert [texts[0], texts[1]] == [c.message.content for c in reply.choices]
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


@pytest.mark.parametrize("as_ids", [False, True], ids=["texts", "token ids"])
def test_several_prompts_in_one_completions_request(client, llm, as_ids):
    texts = [PROMPT, "Water boils at", "The opposite of hot is"]
    prompts = [llm.prompt_ids(t) for t in texts] if as_ids else texts
    reply = client.completions.create(model="smollm2", prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in reply.choices] == list(range(6))
    for i, text in enumerate(texts):
        want = engine(llm, llm.prompt_ids(text), max_tokens=6).text
        assert [reply.choices[2 * i].text, reply.choices[2 * i + 1].text] == [want, want]
    assert reply.usage.prompt_tokens == sum(len(llm.prompt_ids(t)) for t in texts)


def test_a_mixed_prompt_list_is_refused(server):
    with server.http() as http:
        response = http.post("/v1/completions", json={"model": "smollm2", "prompt": ["a", [1, 2]]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    assert "not mixed" in response.json()["error"]["message"]


def test_echo_and_prompt_logprobs(client, llm):
    ids = llm.prompt_ids(PROMPT)
    reply = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=1)
    choice = choice_text = reply.choices[0]
    want = engine(llm, ids, max_tokens=4, prompt_logprobs=1)
    assert choice_text.text == PROMPT + want.text
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 4 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx([e.logprob for e in want.prompt_logprobs], abs=1e-4)
    streamed = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=4, temperature=0, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == PROMPT + want.text
    vllm = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=1, temperature=0,
                                     extra_body={"prompt_logprobs": 2}).model_dump()
    positions = vllm["choices"][0]["prompt_logprobs"]
    assert positions[0] is None and len(positions) == len(ids)
    assert positions[1][str(ids[1])]["logprob"] == pytest.approx(want.prompt_logprobs[0].logprob, abs=1e-4)


def test_truncate_prompt_tokens(client):
    assert chat(client, max_tokens=1, truncate_prompt_tokens=5).usage.prompt_tokens == 5


def test_return_tokens_as_token_ids(client, llm):
    reply = chat(client, max_tokens=3, temperature=0, logprobs=True, top_logprobs=1, return_tokens_as_token_ids=True)
    ids = engine(llm, llm.chat_prompt(QUESTION), max_tokens=3).token_ids
    assert [t.token for t in reply.choices[0].logprobs.content] == [f"token_id:{i}" for i in ids]


# --- the chat template ------------------------------------------------------------------------------------


def test_continue_final_message_and_echo(client, llm):
    start = "The capital of France is"
    messages = QUESTION + [{"role": "assistant", "content": start}]
    ids = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert llm.tokenizer.decode(ids).endswith(start)  # the prompt ends inside the assistant's message
    want = engine(llm, ids, max_tokens=6)
    reply = chat(client, messages, max_tokens=6, temperature=0, continue_final_message=True, add_generation_prompt=False)
    assert reply.choices[0].message.content == want.text and reply.usage.prompt_tokens == len(ids)
    echoed = chat(client, messages, max_tokens=6, temperature=0, continue_final_message=True, add_generation_prompt=False,
                  echo=True)
    assert echoed.choices[0].message.content == start + want.text


def test_a_custom_chat_template_and_its_kwargs(client, llm):
    template = "{{ greeting }}{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}{{ '\n' }}{% endif %}"
    reply = chat(client, max_tokens=1, chat_template=template, chat_template_kwargs={"greeting": "Dear model: "})
    assert reply.usage.prompt_tokens == len(llm.tokenizer.encode("Dear model: What is the capital of France?\n"))
    without = chat(client, max_tokens=1, chat_template=template, chat_template_kwargs={"greeting": "Dear model: "},
                   add_generation_prompt=False)
    assert without.usage.prompt_tokens == len(llm.tokenizer.encode("Dear model: What is the capital of France?"))


# --- structured outputs -----------------------------------------------------------------------------------

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                         "population": {"type": "integer", "minimum": 0, "maximum": 10**8}},
        "required": ["city", "population"], "additionalProperties": False}
ASK_JSON = [{"role": "user", "content": "Reply with a JSON object with a single key city."}]


@pytest.mark.parametrize(
    ("fields", "check"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}},
         lambda t: jsonschema.validate(json.loads(t), CITY) is None),
        ({"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict)),
        ({"guided_json": CITY}, lambda t: jsonschema.validate(json.loads(t), CITY) is None),
        ({"guided_regex": r"[A-Z][a-z]{1,12}, [A-Z][a-z]{1,12}"}, lambda t: re.fullmatch(r"[A-Z][a-z]+, [A-Z][a-z]+", t)),
        ({"guided_choice": ["Paris", "Berlin"]}, lambda t: t in ("Paris", "Berlin")),
        ({"guided_grammar": 'root ::= "It is " [A-Z] [a-z]{1,12} "."'}, lambda t: re.fullmatch(r"It is [A-Z][a-z]+\.", t)),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
        ({"json_schema": CITY}, lambda t: jsonschema.validate(json.loads(t), CITY) is None),  # llama-server
        ({"grammar": 'root ::= ("yes" | "no")'}, lambda t: t in ("yes", "no")),  # llama-server
    ],
    ids=["response_format-json_schema", "response_format-json_object", "guided_json", "guided_regex", "guided_choice",
         "guided_grammar", "structured_outputs", "llama-server-json_schema", "llama-server-grammar"],
)
def test_structured_outputs(client, fields, check):
    reply = chat(client, ASK_JSON, max_tokens=60, temperature=0, **fields)
    assert reply.choices[0].finish_reason == "stop" and check(reply.choices[0].message.content)


def test_structured_output_streamed_and_sampled(client):
    stream = chat(client, ASK_JSON, max_tokens=60, temperature=1.0, seed=1, stream=True,
                  response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}})
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)), CITY)


class City(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=20)
    population: int = pydantic.Field(ge=0, le=10**8)


def test_openai_parse_with_a_pydantic_model(client):
    reply = client.chat.completions.parse(model="smollm2", messages=ASK_JSON, max_tokens=60, temperature=0,
                                          response_format=City)
    assert isinstance(reply.choices[0].message.parsed, City)


def test_langchain_with_structured_output(server):
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(model="smollm2", base_url=f"{server.url}/v1", api_key=server.api_key, temperature=0,
                       max_tokens=60, max_retries=0)
    city = model.with_structured_output(City, method="json_schema").invoke(ASK_JSON[0]["content"])
    assert isinstance(city, City)


def test_a_grammar_that_does_not_compile_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, guided_regex="(unclosed")
    assert "regex" in info.value.body["message"]


# --- tools on a model whose template cannot show them --------------------------------------------------------


def test_tools_for_a_template_without_them_are_refused(client):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, tools=[tool])
    assert info.value.body["param"] == "tools" and "does not show tools" in info.value.body["message"]
    assert chat(client, max_tokens=2, tools=[tool], tool_choice="none").choices[0].message.tool_calls is None


# --- fields deskpod refuses, and fields nobody defines -----------------------------------------------------

ASKING = {  # a value that asks for something, for each field deskpod does not implement
    "audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "x"},
    "web_search_options": {}, "functions": [{"name": "f"}], "function_call": "auto",
    "verbosity": "low", "suffix": "x", "store": True, "service_tier": "flex", "use_beam_search": True, "length_penalty": 0.5,
    "bad_words": ["x"], "spaces_between_special_tokens": False, "logits_processors": ["a.b"], "prompt_embeds": "x",
    "documents": [{"title": "t", "text": "x"}], "mm_processor_kwargs": {"a": 1}, "kv_transfer_params": {"a": 1},
    "vllm_xargs": {"a": 1}, "structural_tag": "x", "priority": 1, "cache_salt": "x", "guided_whitespace_pattern": " ",
    "typical_p": 0.5, "tfs_z": 0.5, "mirostat": 1, "dynatemp_range": 0.5, "dry_multiplier": 0.8, "xtc_probability": 0.5,
    "top_n_sigma": 1.0, "n_keep": 5, "lora": [{"id": 0, "scale": 1.0}], "id_slot": 1, "t_max_predict_ms": 100, "n_indent": 2,
}


def test_every_unimplemented_field_has_a_case():
    assert set(ASKING) == set(NOT_IMPLEMENTED)


@pytest.mark.parametrize("field", sorted(ASKING))
def test_unimplemented_fields_are_refused_by_name(server, field):
    with server.http() as http:
        for route, body in (("/v1/chat/completions", {"messages": QUESTION}), ("/v1/completions", {"prompt": PROMPT})):
            response = http.post(route, json={"model": "smollm2", "max_tokens": 1, **body, field: ASKING[field]})
            assert response.status_code == 400, (route, response.text)
            assert response.json()["error"]["param"] == field


def test_fields_nobody_defines_are_served_and_logged(server):
    with server.http() as http:
        response = http.post("/v1/chat/completions", json={"model": "smollm2", "messages": QUESTION, "max_tokens": 1,
                                                          "deskpod_test_unknown": 1})
    assert response.status_code == 200
    deadline = time.monotonic() + 5
    while "ignored fields no server defines: deskpod_test_unknown" not in server.log.read_text():
        assert time.monotonic() < deadline, "no warning in the server's log"
        time.sleep(0.1)


# --- one request's fault is its own ----------------------------------------------------------------------

BAD = [  # (route, body, the param a 400 names)
    ("/v1/chat/completions", {"messages": QUESTION, "seed": 2**64}, "seed"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
    ("/v1/chat/completions", {"messages": QUESTION, "logit_bias": {"99999999": 5}}, "logit_bias"),
    ("/v1/completions", {"prompt": [99999999]}, "prompt"),
    ("/v1/completions", {"prompt": PROMPT, "stop_token_ids": [99999999]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": PROMPT, "guided_regex": "(("}, None),
    # settings no token can satisfy: found only while generating, and still the request's own 400
    ("/v1/completions", {"prompt": PROMPT, "guided_choice": ["yes"], "allowed_token_ids": [11]}, None),
]


def test_bad_requests_fail_alone_while_streams_go_on(server, client, llm):
    ids = llm.chat_prompt(QUESTION)
    want = engine(llm, ids, max_tokens=40, ignore_eos=True).text

    def stream_one(_: int) -> str:
        stream = chat(client, max_tokens=40, temperature=0, ignore_eos=True, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(stream_one, i) for i in range(4)]
        time.sleep(0.5)  # the streams are under way
        with server.http() as http:
            for route, body, param in BAD:
                response = http.post(route, content=json.dumps({"model": "smollm2", "max_tokens": 8, **body}),
                                     headers={"content-type": "application/json"})
                assert response.status_code == 400, (body, response.text)
                if param is not None:
                    assert response.json()["error"]["param"] == param
            tiny = http.post("/v1/chat/completions", json={"model": "smollm2", "messages": QUESTION, "max_tokens": 8,
                                                           "temperature": 1e-45})
            assert tiny.status_code == 200  # below 1e-5: greedy, as vLLM does
            assert tiny.json()["choices"][0]["message"]["content"] == engine(llm, ids, max_tokens=8).text
        assert [s.result(timeout=120) for s in streams] == [want] * 4


# --- what clients expect around the API --------------------------------------------------------------------


def test_request_ids(server, client):
    with server.http() as http:
        response = http.post("/v1/chat/completions", json={"model": "smollm2", "messages": QUESTION, "max_tokens": 1},
                             headers={"x-request-id": "my-trace-7"})
        assert response.headers["x-request-id"] == "my-trace-7"
        assert len(http.get("/v1/models").headers["x-request-id"]) == 32  # a new one when none was sent
    assert chat(client, max_tokens=1, request_id="abc-123").id == "abc-123"


def test_tokenize_and_detokenize(server, llm):
    with server.http() as http:
        prompt = http.post("/tokenize", json={"model": "smollm2", "prompt": PROMPT, "return_token_strs": True}).json()
        assert prompt["tokens"] == llm.prompt_ids(PROMPT) and prompt["count"] == len(prompt["tokens"])
        assert "".join(prompt["token_strs"]) == PROMPT and prompt["max_model_len"] > 0
        messages = http.post("/tokenize", json={"model": "smollm2", "messages": QUESTION}).json()
        assert messages["tokens"] == llm.chat_prompt(QUESTION)
        back = http.post("/detokenize", json={"model": "smollm2", "tokens": prompt["tokens"]}).json()
        assert back["prompt"] == PROMPT
        bad = http.post("/detokenize", json={"model": "smollm2", "tokens": [10**9]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_openapi_and_docs_are_served_without_the_internet(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize", "/v1/models"):
        assert path in schema["paths"]
    page = httpx.get(f"{server.url}/docs").text
    assets = re.findall(r'(?:src|href)="(/docs/assets/[^"]+)"', page)
    assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets)
    assert "cdn" not in page.lower()
    for asset in assets:
        assert httpx.get(f"{server.url}{asset}").status_code == 200


def test_vllm_metric_names(server, client):
    chat(client, max_tokens=2)
    m = server.metrics()
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                  "vllm:gpu_cache_usage_perc"):
        assert f'{gauge}{{model_name="smollm2"}}' in m
    for counter in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        assert m[f'{counter}{{model_name="smollm2"}}'] > 0
    assert m['vllm:time_to_first_token_seconds_count{model_name="smollm2"}'] >= 1
    assert m['vllm:request_success_total{finished_reason="length",model_name="smollm2"}'] >= 1


@pytest.fixture(scope="module")
def small_server(serve):
    """A 1 MB body limit and one allowed web origin."""
    return serve(["smollm2", "--kv-cache-gb", "0.5", "--max-request-mb", "1", "--allowed-origins", "http://app.test"])


def test_cors_for_the_allowed_origin_only(small_server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    allowed = httpx.options(f"{small_server.url}/v1/chat/completions", headers={"Origin": "http://app.test", **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://app.test"
    other = httpx.options(f"{small_server.url}/v1/chat/completions", headers={"Origin": "http://evil.test", **preflight})
    assert "access-control-allow-origin" not in other.headers
    # the request itself, as a browser sends it from that page (another site): let in for the allowed origin only
    body = {"model": "smollm2", "prompt": "Hi", "max_tokens": 1}
    browser = {"Sec-Fetch-Site": "cross-site"}
    let_in = httpx.post(f"{small_server.url}/v1/completions", json=body, headers={"Origin": "http://app.test", **browser})
    assert let_in.status_code == 200 and let_in.headers["access-control-allow-origin"] == "http://app.test"
    refused = httpx.post(f"{small_server.url}/v1/completions", json=body, headers={"Origin": "http://evil.test", **browser})
    assert refused.status_code == 403


def test_a_body_over_the_limit_is_413_before_it_is_read(small_server):
    start = time.monotonic()
    response = httpx.post(f"{small_server.url}/v1/completions",
                          json={"model": "smollm2", "prompt": "word " * 400_000, "max_tokens": 1}, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert time.monotonic() - start < 10


def test_a_prompt_no_context_can_hold_is_refused_before_tokenizing(small_server):
    response = httpx.post(f"{small_server.url}/v1/completions",
                          json={"model": "smollm2", "prompt": "x" * 900_000, "max_tokens": 1}, timeout=60)
    assert response.status_code == 400 and "characters" in response.json()["error"]["message"]
