"""Errors the services raise; each carries the HTTP status the API maps it to."""

from __future__ import annotations

from alignflow.errors import AlignflowError


class ServiceError(AlignflowError):
    """A request the platform refuses; `status` is the HTTP status the API maps it to."""

    status = 400

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFound(ServiceError):
    status = 404


class Forbidden(ServiceError):
    status = 403


class Conflict(ServiceError):
    status = 409


class Invalid(ServiceError):
    status = 422
