"""Which request fields deskpod honours, which it refuses, which it lets pass.

Clients move between OpenAI, vLLM and llama-server and send their fields unchanged. A field one of those
servers defines is either honoured (a field of the request models) or, when deskpod does not implement
it, refused with a 400 naming it — unless it holds the value that means "nothing special", which clients
send by default. A field nobody defines is ignored and named in a warning log line (new API versions add
fields; failing on them would break clients for nothing).
"""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger("deskpod.server")

# field -> the values that ask for nothing (accepted as if absent)
NOT_IMPLEMENTED: dict[str, tuple[Any, ...]] = {
    # OpenAI
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "functions": (None, []),  # the pre-tools API: send `tools`
    "function_call": (None, "none"),
    "verbosity": (None,),
    "suffix": (None, ""),  # fill-in-the-middle
    "store": (None, False),  # stored completions
    "service_tier": (None, "auto", "default"),
    # vLLM
    "use_beam_search": (False,),
    "length_penalty": (1, 1.0),
    "bad_words": (None, []),
    "spaces_between_special_tokens": (True,),
    "logits_processors": (None, []),
    "prompt_embeds": (None,),
    "documents": (None, []),
    "mm_processor_kwargs": (None, {}),
    "kv_transfer_params": (None, {}),
    "vllm_xargs": (None, {}),
    "structural_tag": (None,),
    "priority": (0,),
    "cache_salt": (None,),
    "guided_whitespace_pattern": (None,),
    # llama-server
    "typical_p": (1, 1.0),
    "tfs_z": (1, 1.0),
    "mirostat": (0,),
    "dynatemp_range": (0, 0.0),
    "dry_multiplier": (0, 0.0),
    "xtc_probability": (0, 0.0),
    "top_n_sigma": (-1, -1.0),
    "n_keep": (0,),
    "lora": (None, []),
    "id_slot": (-1,),
    "t_max_predict_ms": (0,),
    "n_indent": (0,),
}

# fields that say who sent a request or how to cache it, with no effect on the output: accepted
INFORMATIONAL = frozenset({
    "user", "metadata", "prompt_cache_key", "safety_identifier",  # OpenAI
    "cache_prompt",  # llama-server: deskpod's prefix cache is always on
    "mirostat_tau", "mirostat_eta", "dynatemp_exponent", "dry_base", "dry_allowed_length", "dry_penalty_last_n",
    "dry_sequence_breakers", "xtc_threshold",  # llama-server: the settings of samplers that are off
})


class FieldError(ValueError):
    """A validation error that belongs to one field, raised where pydantic cannot tell which (a model
    validator): deskpod.server.errors reports `field` as the error's `param`."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def refuse_unimplemented(data: dict) -> None:
    """FieldError for the first field deskpod does not implement that asks for something."""
    for name, defaults in NOT_IMPLEMENTED.items():
        if name in data and not any(data[name] == d and type(data[name]) is type(d) for d in defaults):
            raise FieldError(name, f"not supported by deskpod: leave it out (or send {json.dumps(defaults[-1])})")


def log_ignored(data: dict, known: set[str], route: str) -> None:
    ignored = sorted(set(data) - known - set(NOT_IMPLEMENTED) - INFORMATIONAL)
    if ignored:
        log.warning("%s: ignored fields no server defines: %s", route, ", ".join(ignored))
