"""Bearer-token auth: the admin token for people and tools, host tokens for agents."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fleetvisor.controller.core import Controller
from fleetvisor.errors import Forbidden, Unauthorized
from fleetvisor.store.tables import HostRow

bearer = HTTPBearer(auto_error=False, description="the admin token, or a host token for agents")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def controller_of(request: Request) -> Controller:
    controller: Controller = request.app.state.controller
    return controller


def _token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials:
        raise Unauthorized(
            "send the admin token as 'Authorization: Bearer TOKEN'; it is in "
            "the controller's state directory (admin.token)"
        )
    return credentials.credentials


def require_admin(request: Request, credentials: Credentials) -> None:
    token = _token(credentials)
    controller = controller_of(request)
    if hmac.compare_digest(token.encode(), controller.admin_token.encode()):
        return
    if controller.hosts.authenticate(token) is not None:
        raise Forbidden("a host token cannot do this; use the admin token")
    raise Unauthorized("the token is not valid; use the admin token from the state directory")


def require_host(request: Request, credentials: Credentials) -> HostRow:
    token = _token(credentials)
    host = controller_of(request).hosts.authenticate(token)
    if host is None:
        raise Unauthorized("the host token is not valid; register the host again")
    return host


Admin = Depends(require_admin)


def require_any(request: Request, credentials: Credentials) -> None:
    """The admin token or any host's token (read-only data agents need too)."""
    token = _token(credentials)
    controller = controller_of(request)
    if hmac.compare_digest(token.encode(), controller.admin_token.encode()):
        return
    if controller.hosts.authenticate(token) is None:
        raise Unauthorized("the token is not valid; use the admin token or a host token")


AdminOrHost = Depends(require_any)
