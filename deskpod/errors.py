"""Errors a user can act on. The CLI prints their message without a traceback."""


class DeskpodError(Exception):
    """Base class: the message says what went wrong and how to fix it."""


class ModelNotFound(DeskpodError):
    pass


class InvalidModelName(DeskpodError):
    pass


class CorruptModel(DeskpodError):
    pass


class UnsupportedModel(DeskpodError):
    pass


class InvalidRequest(DeskpodError):
    """A request the engine cannot take as it is (the server answers 400)."""


class PromptTooLong(InvalidRequest):
    pass


class ModelNotReady(DeskpodError):
    """The model exists but cannot serve now: loading, unloading, or failed to load (the server answers 503)."""


class LinkLost(ModelNotReady):
    """A box of a linked model went away: the requests in flight end with this (503), until it joins again."""


class BackendError(DeskpodError):
    """A model's own code failed while executing a request (the server answers 500; other requests go on)."""


class GenerationFailed(DeskpodError):
    """The engine failed on this request's share of a step; the other requests go on (the server answers 500)."""
