"""Errors a user can cause. Each maps to a 4xx answer whose message says what to change.

Every layer raises these; the API turns them into application/problem+json, the
CLI prints them. A 500 is always a bug, never one of these.
"""

from __future__ import annotations


class FleetvisorError(Exception):
    """Base of every user-facing error."""

    status: int = 400
    kind: str = "bad-request"
    title: str = "Bad request"

    def __init__(self, detail: str, **extra: object) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class InvalidInput(FleetvisorError):
    status, kind, title = 422, "invalid-input", "Invalid input"


class NotFound(FleetvisorError):
    status, kind, title = 404, "not-found", "Not found"


class AlreadyExists(FleetvisorError):
    status, kind, title = 409, "already-exists", "Already exists"


class Conflict(FleetvisorError):
    """The request is valid but the current state does not allow it."""

    status, kind, title = 409, "conflict", "Conflict with current state"


class InsufficientCapacity(FleetvisorError):
    status, kind, title = 409, "insufficient-capacity", "No host can take this instance"


class Unauthorized(FleetvisorError):
    status, kind, title = 401, "unauthorized", "Missing or invalid token"


class Forbidden(FleetvisorError):
    status, kind, title = 403, "forbidden", "Token not allowed here"


class AgentUnreachable(Exception):
    """The controller could not reach a host's agent. Internal: operations retry on it."""


class DriverError(Exception):
    """A driver failed to do what it was asked. Internal: the operation records it."""
