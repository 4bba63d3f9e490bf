"""Errors of the identity layer, each with the HTTP status and code the admin API answers.

Messages are shown to clients: they never contain a password, a token or a key.
"""

from __future__ import annotations

__all__ = [
    "BodyTooLarge",
    "Conflict",
    "Forbidden",
    "IdentityError",
    "Invalid",
    "NotFound",
    "TooManyAttempts",
    "Unauthorized",
    "UnsupportedEncoding",
]


class IdentityError(Exception):
    status = 500
    code = "internal_error"
    type = "server_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class Invalid(IdentityError):
    status = 400
    code = "invalid_request"
    type = "invalid_request_error"


class BodyTooLarge(Invalid):
    """An admin request body over :data:`proxy.admin_api.MAX_ADMIN_BODY`."""

    status = 413
    code = "body_too_large"


class UnsupportedEncoding(Invalid):
    """A content-encoded request body (nobody's client compresses these)."""

    status = 415
    code = "unsupported_content_encoding"


class Unauthorized(IdentityError):
    status = 401
    code = "unauthorized"
    type = "authentication_error"


class Forbidden(IdentityError):
    status = 403
    code = "forbidden"
    type = "permission_error"


class NotFound(IdentityError):
    """Also what a caller gets for another domain's objects: their existence is not revealed."""

    status = 404
    code = "not_found"
    type = "not_found_error"


class Conflict(IdentityError):
    status = 409
    code = "conflict"
    type = "invalid_request_error"


class TooManyAttempts(IdentityError):
    status = 429
    code = "too_many_attempts"
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after
