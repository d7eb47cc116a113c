"""Exception tree of the gateway and its conversion to the OpenAI error body."""

from __future__ import annotations

import json
from typing import Any


class GatewayError(Exception):
    """Base class of every error the gateway reports to a client."""

    status_code = 500
    error_type = "server_error"

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_body(self) -> dict[str, Any]:
        """Return the OpenAI-shaped error body."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(GatewayError):
    status_code = 401
    error_type = "authentication_error"


class NotFoundError(GatewayError):
    status_code = 404
    error_type = "not_found_error"


class PayloadTooLargeError(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"


class ServiceUnavailableError(GatewayError):
    status_code = 503
    error_type = "service_unavailable_error"


class UpstreamError(GatewayError):
    """The upstream model server refused the connection, failed or sent garbage."""

    status_code = 502
    error_type = "upstream_error"


class UpstreamTimeoutError(UpstreamError):
    status_code = 504
    error_type = "upstream_timeout_error"


class UpstreamStatusError(GatewayError):
    """The upstream rejected a request with a 4xx status.

    The client gets the same status, and the upstream's message in the OpenAI
    error shape.
    """

    error_type = "invalid_request_error"

    def __init__(self, status_code: int, body: bytes, content_type: str) -> None:
        super().__init__(f"The upstream returned HTTP {status_code}.")
        self.status_code = status_code
        self.body = body
        self.content_type = content_type

    def to_body(self) -> dict[str, Any]:
        """Return the upstream's error in the OpenAI shape, whatever shape it had."""
        detail: Any = None
        try:
            detail = json.loads(self.body)
        except ValueError:
            pass
        error = detail.get("error") if isinstance(detail, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return _error_body(
                error["message"],
                error.get("type") if isinstance(error.get("type"), str) else None,
                error.get("param") if isinstance(error.get("param"), str) else None,
                error.get("code"),
                self.status_code,
            )
        text = self.body[:500].decode("utf-8", "replace").strip()
        if isinstance(error, str):
            text = error
        elif isinstance(detail, dict) and isinstance(detail.get("message"), str):
            text = detail["message"]
        message = f"The upstream returned HTTP {self.status_code}: {text or 'no body'}"
        return _error_body(message, None, None, None, self.status_code)


def _error_body(
    message: str, kind: str | None, param: str | None, code: object, status: int
) -> dict[str, Any]:
    default_type = "not_found_error" if status == 404 else "invalid_request_error"
    return {
        "error": {
            "message": message,
            "type": kind or default_type,
            "param": param,
            "code": None if code is None else str(code),
        }
    }


class PromptVersionNotFoundError(NotFoundError):
    def __init__(self, version: str, *, param: str | None = None) -> None:
        super().__init__(
            f"Prompt version {version!r} does not exist. "
            "Run `drpo-gateway prompts list` to see the stored versions.",
            param=param,
            code="prompt_version_not_found",
        )
        self.version = version


class ConfigurationError(Exception):
    """A setting is invalid or a required component is missing at start-up."""


class EngineError(ConfigurationError):
    """The embedded or managed model server failed to start or stopped."""
