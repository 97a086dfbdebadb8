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
