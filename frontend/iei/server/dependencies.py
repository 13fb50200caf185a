"""Typed dependencies shared by the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .auth import UNAUTHORIZED, key_accepted
from .embedding import Services


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def require_api_key(request: Request, services: ServicesDep) -> None:
    """The key again, on the route itself (the Admission middleware checked it before the body
    was read): a route is never open by accident of the middleware's path list."""
    if not key_accepted(request.headers.get("authorization", ""), services.settings.api_key):
        raise UNAUTHORIZED


Authorized = Depends(require_api_key)
