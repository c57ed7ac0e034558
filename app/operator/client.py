"""The HTTP client of every operator command: the control plane's URL and the caller's API token,
and the API's error answers turned into ``ApiError``."""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import typer

from app.cli import _fail, _server_url
from app.identity.cli_token import TokenFileError, auth_headers

__all__ = ["ApiError", "Client", "NamespaceOption", "make_client"]

PAGE_SIZE = 200

# Shared by get and export: the scope of what they ask the API for.
NamespaceOption = Annotated[
    str | None, typer.Option("--namespace", "-n", help="Only this namespace.", show_default=False)
]


class ApiError(Exception):
    """The control plane answered with an error status."""

    def __init__(self, status: int, detail: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.errors = errors


def make_client(base_url: str) -> httpx.Client:
    """The HTTP client of every operator command (tests swap it for one bound to the app)."""
    return httpx.Client(base_url=base_url, timeout=30.0)


class Client:
    def __init__(self, server: str | None, reason: str | None = None) -> None:
        self.url = _server_url(server)
        self.http = make_client(self.url)
        try:
            self.headers = auth_headers()
        except TokenFileError as exc:
            _fail(str(exc))
        if reason:
            self.headers["X-Mesh-Reason"] = reason

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, self.url + path, headers=self.headers, **kwargs)
        except httpx.HTTPError as exc:
            reason = " ".join(str(exc).split()) or exc.__class__.__name__
            _fail(f"cannot reach the control plane at {self.url}: {reason}")
        if response.status_code >= 400:
            raise _api_error(response)
        return response.json() if response.content else None

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def fetch(self, path: str, **params: Any) -> Any:
        """GET, and any error status is one line and exit 2."""
        try:
            return self.get(path, **params)
        except ApiError as exc:
            _fail(str(exc))

    def services(self, namespace: str | None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        page = 1
        while True:
            data = self.get("/api/v1/services", namespace=namespace, page=page, page_size=PAGE_SIZE)
            items.extend(data["items"])
            if page >= data["pages"]:
                return items
            page += 1


def _api_error(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        return ApiError(response.status_code, response.text[:300] or response.reason_phrase, [])
    detail = body.get("detail", body) if isinstance(body, dict) else body
    errors: list[dict[str, Any]] = list(body.get("errors", [])) if isinstance(body, dict) else []
    if isinstance(detail, list):  # FastAPI's own 422 shape
        errors = [
            {"field": ".".join(str(p) for p in item.get("loc", [])), "message": item.get("msg")}
            for item in detail
            if isinstance(item, dict)
        ]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return ApiError(response.status_code, str(detail), errors)
