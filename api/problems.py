"""Errors as `application/problem+json` (RFC 9457): a status, a title, a detail a person can act
on, and for validation errors the list of fields with what is wrong and what is allowed."""
from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

MEDIA_TYPE = "application/problem+json"


class Problem(Exception):
    def __init__(self, status: int, title: str, detail: str,
                 errors: list[dict[str, str]] | None = None, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail
        self.errors, self.headers = errors, headers


def problem_response(status: int, title: str, detail: str, instance: str,
                     errors: list[dict[str, str]] | None = None,
                     headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status,
                            "detail": detail, "instance": instance}
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def field_errors(problems: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"field": field, "message": message} for field, message in problems]


def install(app) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, error: Problem):
        return problem_response(error.status, error.title, error.detail, request.url.path,
                                error.errors, error.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        errors = [{"field": ".".join(str(p) for p in item["loc"] if p != "body") or "body",
                   "message": item["msg"]} for item in error.errors()]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return problem_response(422, "Invalid request", detail, request.url.path, errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException):
        titles = {404: "Not found", 405: "Method not allowed", 401: "Unauthorized"}
        detail = error.detail if isinstance(error.detail, str) else str(error.detail)
        if error.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}"
        return problem_response(error.status_code, titles.get(error.status_code, "Error"),
                                detail, request.url.path, headers=getattr(error, "headers", None))
