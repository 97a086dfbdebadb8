"""/tokenize and /detokenize over a served LLM's tokenizer."""

from __future__ import annotations

import asyncio

from deskpod.errors import DeskpodError, InvalidRequest
from deskpod.server.errors import APIError, from_engine_error
from deskpod.server.openai.tokenize.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from deskpod.server.registry import ModelRegistry


class OpenAIServingTokenization:
    def __init__(self, models: ModelRegistry):
        self.models = models

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        if (request.prompt is None) == (request.messages is None):
            raise APIError(400, "send either prompt or messages", param="prompt")
        engine = self.models.llm(request.model)
        field = "prompt" if request.prompt is not None else "messages"
        try:
            ids = await asyncio.to_thread(self._ids, engine, request)
        except DeskpodError as e:
            raise from_engine_error(e, field) from e
        strs = [engine.tokenizer.token_text(i) for i in ids] if request.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_context, tokens=ids, token_strs=strs)

    @staticmethod
    def _ids(engine, request: TokenizeRequest) -> list[int]:
        if request.prompt is not None:
            return engine.tokenizer.encode(request.prompt, add_bos=None if request.add_special_tokens in (None, True) else False)
        extra = dict(request.chat_template_kwargs or {})
        if request.tools:
            extra["tools"] = [t.model_dump(exclude_none=True) for t in request.tools]
        messages = [m.template_dict() for m in request.messages or []]
        return engine.chat_prompt(messages, add_generation_prompt=request.add_generation_prompt,
                                  continue_final_message=request.continue_final_message, template=request.chat_template,
                                  add_bos=request.add_special_tokens, **extra)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        engine = self.models.llm(request.model)
        vocab = engine.engine.loaded.spec.vocab_size
        bad = [t for t in request.tokens if t >= vocab]
        if bad:
            raise from_engine_error(InvalidRequest(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})"), "tokens")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(request.tokens, skip_special=False))
