"""What chat and text completions share: sampling fields and their mapping to SamplingParams, structured
outputs, usage, errors.

Field checks mirror SamplingParams' own, so that a bad value is refused by pydantic with the field's name
(400) before anything reaches the engine. Fields of OpenAI, vLLM and llama-server that deskpod does not
implement are refused by name unless they ask for nothing (deskpod.server.openai.fields).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from deskpod.engine.sampler import LOGIT_BIAS_RANGE, MAX_LOGPROBS, SamplingParams, StructuredOutput
from deskpod.server.openai.fields import FieldError, log_ignored, refuse_unimplemented

MAX_TOP_LOGPROBS = MAX_LOGPROBS
MAX_STOP_STRINGS = 16
MAX_CHOICES = 16  # n: each choice is a request in the engine
LOGPROB_FLOOR = -9999.0  # JSON has no -inf: a token the model rules out gets this


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class OpenAIModel(BaseModel):
    # extra fields are kept (not refused): clients send fields from newer API versions
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: Literal[False] = False  # vLLM's usage in every chunk: not implemented


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class JsonSchemaFormat(OpenAIModel):
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | bool = Field(default=True, alias="schema")  # `schema` clashes with pydantic's
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema: {name, schema}")
        return self


class StructuredOutputsField(OpenAIModel):
    """vLLM's `structured_outputs` (the newer name of its guided_* fields)."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


def _grammar(text: str) -> StructuredOutput:
    """GBNF (llama.cpp's, rules with `::=`) or Lark (llguidance's and vLLM's other dialect)."""
    return StructuredOutput("gbnf" if "::=" in text else "lark", text)


def _schema(schema: dict | str | bool) -> StructuredOutput:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ValueError(f"the JSON schema is not JSON: {e}") from None
    return StructuredOutput("json_schema", json.dumps(schema))


class SamplingRequest(OpenAIModel):
    """The fields of /v1/chat/completions and /v1/completions that become SamplingParams."""

    ROUTE: ClassVar[str] = ""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # the newer name of max_tokens
    n_predict: Annotated[int, Field(ge=-1)] | None = None  # llama-server's name (-1: until the context is full)
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # vLLM's and llama-server's; -1 and 0 both mean off
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    include_stop_str_in_output: bool = False
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    best_of: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    repeat_penalty: Annotated[float, Field(gt=0, le=10)] | None = None  # llama-server's name
    repeat_last_n: Annotated[int, Field(ge=-1)] | None = None  # llama-server: penalties over the last n tokens
    penalty_last_n: Annotated[int, Field(ge=-1)] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    logit_bias: dict[str, Annotated[float, Field(ge=-LOGIT_BIAS_RANGE, le=LOGIT_BIAS_RANGE)]] | None = None
    allowed_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] | None = None
    skip_special_tokens: bool = True
    truncate_prompt_tokens: Annotated[int, Field(ge=1)] | None = None
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    return_tokens_as_token_ids: bool = False
    # structured outputs: OpenAI's, vLLM's (both generations), llama-server's
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # any backend asks for the same constraint: deskpod uses llguidance
    structured_outputs: StructuredOutputsField | None = None
    json_schema: dict[str, Any] | None = None  # llama-server
    grammar: str | None = None  # llama-server (GBNF)
    request_id: str | None = None  # vLLM: the id the response carries

    @model_validator(mode="before")
    @classmethod
    def _refuse_unimplemented(cls, data: Any) -> Any:
        if isinstance(data, dict):
            refuse_unimplemented(data)
            log_ignored(data, set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}, cls.ROUTE)
        return data

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if not all(strings):
            raise ValueError("stop strings must not be empty")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not key.lstrip("-").isdigit() or int(key) < 0:
                raise ValueError(f"logit_bias keys are token ids (as strings), got {key!r}")
        return bias

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        if best_of is not None and best_of != info.data.get("n", 1):
            raise ValueError("best_of other than n is not supported: send n choices and pick among them")
        return best_of

    @field_validator("stream_options")
    @classmethod
    def _options_need_stream(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream: true")
        return options

    @model_validator(mode="after")
    def _consistent(self) -> SamplingRequest:
        maxes = {v for v in (self.max_tokens, self.max_completion_tokens) if v is not None}
        if len(maxes) > 1:
            raise FieldError("max_completion_tokens", "it differs from max_tokens: send one of them")
        if self.repetition_penalty is not None and self.repeat_penalty is not None:
            raise FieldError("repeat_penalty", "it is repetition_penalty under llama-server's name: send one")
        if self.min_tokens and self.requested_max_tokens() is not None and self.min_tokens > self.requested_max_tokens():
            raise FieldError("min_tokens", "it is more than max_tokens")
        self.structured()  # at most one structured output, each well formed
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        if self.n_predict is not None and self.n_predict >= 0 and not (self.max_tokens or self.max_completion_tokens):
            return max(self.n_predict, 1)
        return self.max_completion_tokens or self.max_tokens

    def structured(self) -> StructuredOutput | None:
        """The one structured output the request asks for (FieldError when it asks for several, or for one
        that is malformed)."""
        fmt, so = self.response_format, self.structured_outputs
        asked = {  # field -> how to build its structured output, for the fields that are set
            "response_format": fmt and fmt.type != "text" and (
                (lambda: StructuredOutput("json_object")) if fmt.type == "json_object"
                else (lambda: _schema(fmt.json_schema.json_schema))),  # type: ignore[union-attr]
            "guided_json": self.guided_json is not None and (lambda: _schema(self.guided_json)),
            "guided_regex": self.guided_regex is not None and (lambda: StructuredOutput("regex", self.guided_regex)),
            "guided_choice": self.guided_choice is not None and (lambda: StructuredOutput("choice", json.dumps(self.guided_choice))),
            "guided_grammar": self.guided_grammar is not None and (lambda: _grammar(self.guided_grammar)),
            "json_schema": self.json_schema is not None and (lambda: _schema(self.json_schema)),
            "grammar": self.grammar is not None and (lambda: StructuredOutput("gbnf", self.grammar)),
            "structured_outputs.json": so and so.json_ is not None and (lambda: _schema(so.json_)),
            "structured_outputs.regex": so and so.regex is not None and (lambda: StructuredOutput("regex", so.regex)),
            "structured_outputs.choice": so and so.choice is not None and (lambda: StructuredOutput("choice", json.dumps(so.choice))),
            "structured_outputs.grammar": so and so.grammar is not None and (lambda: _grammar(so.grammar)),
            "structured_outputs.json_object": so and so.json_object and (lambda: StructuredOutput("json_object")),
        }
        asked = {name: make for name, make in asked.items() if make}
        if len(asked) > 1:
            first, second = list(asked)[:2]
            raise FieldError(second.split(".")[0], f"{first} and {second} each constrain the output: send one")
        for name, make in asked.items():
            try:
                return make()
            except ValueError as e:
                raise FieldError(name.split(".")[0], str(e)) from None
        return None

    def penalties(self) -> dict[str, Any]:
        window = self.repeat_last_n if self.repeat_last_n is not None else self.penalty_last_n
        values = {
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "repetition_penalty": self.repetition_penalty or self.repeat_penalty or 1.0,
        }
        if window == 0:  # llama.cpp: penalties off
            return {}
        return values | ({"penalty_window": window} if window is not None and window > 0 else {})

    def sampling_params(self, room: int, logprobs: int | None, structured: StructuredOutput | None = None,
                        choice: int = 0) -> SamplingParams:
        """`room`: the context left after the prompt, the default (and at least 1) for max_tokens; `choice`:
        which of the n choices (a seed gives each its own stream: seed + choice)."""
        return SamplingParams(
            max_tokens=self.requested_max_tokens() or max(room, 1),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=max(self.top_k or 0, 0),
            top_p=1.0 if self.top_p is None else self.top_p,
            min_p=self.min_p or 0.0,
            seed=self.seed if self.seed is None or choice == 0 else (self.seed + choice) % 2**64,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            **self.penalties(),
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            allowed_token_ids=tuple(self.allowed_token_ids) if self.allowed_token_ids else None,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            structured=structured or self.structured(),
        )


def clamp_logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def prompt_logprobs_body(entries: list | None) -> list[dict | None] | None:
    """vLLM's `prompt_logprobs`: None for the first prompt token (nothing predicts it), then per token
    {token id: {"logprob", "rank", "decoded_token"}} for it and the most likely alternatives."""
    if entries is None:
        return None
    body: list[dict | None] = [None]
    for t in entries:
        position = {str(t.token_id): {"logprob": clamp_logprob(t.logprob), "rank": t.rank, "decoded_token": t.token}}
        for rank, (token_id, text, logprob) in enumerate(t.top, 1):
            position.setdefault(str(token_id), {"logprob": clamp_logprob(logprob), "rank": rank, "decoded_token": text})
        body.append(position)
    return body
