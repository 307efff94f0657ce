"""Exceptions of the encoding layer; all are ValueError so a server can map them to HTTP 400."""


class EncodingError(ValueError):
    """The conversation cannot be rendered (bad role, bad tool-call arguments, unknown effort…)."""


class ParseError(ValueError):
    """The strict parser rejected a completion (the reference's assertion errors, spec §5.2)."""


class RequestError(ValueError):
    """An OpenAI/Anthropic request uses something V4 cannot express (images, an unknown tool…);
    `param` names the request field when one is to blame, for the API's error body."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
