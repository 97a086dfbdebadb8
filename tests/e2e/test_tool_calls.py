"""Tool calling on a model whose chat template teaches it: Qwen2.5-Coder-0.5B-Instruct (hermes format) from
the catalog, through the official `openai` client and LangChain's `bind_tools` agent loop.

A 0.5B model picks tools well and arguments less so (it may add 3 and 4 when asked to multiply 7 by 5): the
tests check what deskpod owns (the tools reach the prompt, the calls come back as OpenAI's tool_calls,
streamed or whole, forced calls follow their schema, results go back into the conversation), not the
model's arithmetic."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Berlin?"}]


@pytest.fixture(scope="module")
def qwen(serve, store):
    store.pull("qwen2.5-coder-0.5b", progress=False)
    return serve(["qwen2.5-coder-0.5b", "--ctx", "4096", "--kv-cache-gb", "0.5"])


@pytest.fixture(scope="module")
def client(qwen) -> openai.OpenAI:
    return qwen.client(max_retries=0)


def ask(client: openai.OpenAI, messages=ASK, **fields):
    return client.chat.completions.create(model="qwen2.5-coder-0.5b", messages=messages, max_tokens=80, temperature=0,
                                          **fields)


def test_the_tools_reach_the_prompt(qwen):
    with qwen.http() as http:
        plain = http.post("/tokenize", json={"model": "qwen2.5-coder-0.5b", "messages": ASK}).json()["tokens"]
        tooled = http.post("/tokenize", json={"model": "qwen2.5-coder-0.5b", "messages": ASK, "tools": [WEATHER]}).json()["tokens"]
        text = http.post("/detokenize", json={"model": "qwen2.5-coder-0.5b", "tokens": tooled}).json()["prompt"]
    assert len(tooled) > len(plain) and '"name": "get_weather"' in text and "<tools>" in text


def test_a_call_comes_back_as_tool_calls(client):
    reply = ask(client, tools=[WEATHER, TIME])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Berlin"}


def test_calls_stream_as_deltas(client):
    stream = ask(client, tools=[WEATHER, TIME], stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:  # accumulated as clients do
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = delta.id or call["id"]
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls" and [c["name"] for c in calls.values()] == ["get_weather"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Berlin"} and calls[0]["id"]


def test_required_and_named_tool_choice_are_enforced(client):
    required = ask(client, [{"role": "user", "content": "Hello!"}], tools=[WEATHER, TIME], tool_choice="required")
    calls = required.choices[0].message.tool_calls
    assert calls and all(c.function.name in ("get_weather", "get_time") for c in calls)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    named = ask(client, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    [call] = named.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), schemas["get_time"])


def test_one_call_when_parallel_calls_are_off(client):
    ask_two = [{"role": "user", "content": "What is the weather in Berlin and in Paris?"}]
    reply = ask(client, ask_two, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    assert len(reply.choices[0].message.tool_calls) == 1


def test_calls_and_results_in_the_history_are_rendered(qwen):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Berlin"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    with qwen.http() as http:
        ids = http.post("/tokenize", json={"model": "qwen2.5-coder-0.5b", "messages": history, "tools": [WEATHER]}).json()["tokens"]
        text = http.post("/detokenize", json={"model": "qwen2.5-coder-0.5b", "tokens": ids}).json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Berlin"}}\n</tool_call>' in text
    assert "<tool_response>\n18 degrees and sunny\n</tool_response>" in text


def test_langchain_agent_loop_with_two_tools(qwen):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @tool
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    tools = {"add": add, "multiply": multiply}
    model = ChatOpenAI(model="qwen2.5-coder-0.5b", base_url=f"{qwen.url}/v1", api_key="none", temperature=0,
                       max_tokens=100, max_retries=0).bind_tools([add, multiply])
    messages = [HumanMessage("What is (3 + 4) * 5? First call add, then call multiply with its result.")]
    called = []
    for _ in range(6):
        reply = model.invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            break
        for call in reply.tool_calls:  # each call's arguments arrive parsed and valid for its tool
            called.append(call["name"])
            messages.append(ToolMessage(str(tools[call["name"]].invoke(call["args"])), tool_call_id=call["id"]))
    else:
        pytest.fail(f"the agent loop did not end in 6 turns: {called}")
    assert {"add", "multiply"} <= set(called)
    assert any(isinstance(m, ToolMessage) for m in messages) and not messages[-1].tool_calls
