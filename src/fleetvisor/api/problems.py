"""Errors as application/problem+json (RFC 9457). User errors are 4xx; anything else is a bug."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fleetvisor.errors import FleetvisorError

log = logging.getLogger(__name__)
PROBLEM = "application/problem+json"


def problem(status: int, kind: str, title: str, detail: str, **extra: object) -> JSONResponse:
    body = {
        "type": f"https://fleetvisor.dev/problems/{kind}",
        "title": title,
        "status": status,
        "detail": detail,
        **extra,
    }
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(FleetvisorError)
    async def _user_error(_request: Request, exc: FleetvisorError) -> JSONResponse:
        extra = {
            k: v for k, v in exc.extra.items() if isinstance(v, str | int | float | dict | list)
        }
        return problem(exc.status, exc.kind, exc.title, exc.detail, **extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"where": ".".join(str(p) for p in err.get("loc", ())), "problem": err.get("msg", "")}
            for err in exc.errors()
        ][:20]
        detail = "; ".join(f"{e['where']}: {e['problem']}" for e in errors)
        return problem(
            422,
            "invalid-input",
            "Invalid input",
            f"fix these fields and retry: {detail}",
            errors=errors,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            detail = "no such endpoint; see /openapi.json for the API"
        elif exc.status_code == 405:
            detail = "this endpoint does not take that method; see /openapi.json"
        return problem(exc.status_code, "http", detail, detail)

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return problem(
            500,
            "internal",
            "Internal error",
            f"this is a bug in fleetvisor, please report it: {exc.__class__.__name__}",
        )
