"""Exceptions of the encoding layer; all are ValueError so a server can map them to HTTP 400."""


class EncodingError(ValueError):
    """The conversation cannot be rendered (bad role, bad tool-call arguments, unknown effort…)."""


class ParseError(ValueError):
    """The strict parser rejected a completion (the reference's assertion errors, spec §5.2)."""


class RequestError(ValueError):
    """An OpenAI/Anthropic request uses something V4 cannot express (images, forced tool choice…)."""
