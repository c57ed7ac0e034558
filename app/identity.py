"""Who is acting. Until sign-in exists every change is made by one placeholder identity;
this module is the single place the authentication work will replace."""

from __future__ import annotations

from starlette.requests import Request

PLACEHOLDER_ACTOR = "anonymous@console"
CLI_ACTOR = "operator@meshctl"


def actor_for_request(request: Request) -> str:
    return PLACEHOLDER_ACTOR
