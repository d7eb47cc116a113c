"""Exception tree of the gateway and its conversion to the OpenAI error body."""

from __future__ import annotations

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
    """The upstream answered with a 4xx status; its body is passed on unchanged."""

    error_type = "invalid_request_error"

    def __init__(self, status_code: int, body: bytes, content_type: str) -> None:
        super().__init__(f"The upstream returned HTTP {status_code}.")
        self.status_code = status_code
        self.body = body
        self.content_type = content_type


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
