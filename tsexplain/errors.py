"""Errors that map to a per-request HTTP answer."""


class RequestError(Exception):
    """A problem with one request, answered with ``status`` and a JSON body.

    ``kind`` is a short machine-readable type (``"bad_image"``, ``"unknown_target"``),
    ``message`` says what was wrong in words a client can act on. Neither may hold
    payload bytes, tokens or attribution values.
    """

    def __init__(self, message: str, kind: str = "bad_request", status: int = 400):
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.status = status

    def to_json(self) -> dict:
        return {"code": self.status, "type": self.kind, "message": self.message}


class ConfigError(ValueError):
    """Invalid settings: raised at load time so the model fails to load loudly."""
