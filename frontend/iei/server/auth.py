"""The API key: `Authorization: Bearer <IEI_API_KEY>`, as in TEI."""

from __future__ import annotations

import hmac

from pydantic import SecretStr

from .errors import ApiError, ErrorType


def key_accepted(authorization: str, key: SecretStr | None) -> bool:
    """`Authorization: Bearer <IEI_API_KEY>` when a key is set (compared in constant time)."""
    if key is None:
        return True
    scheme, _, given = authorization.partition(" ")
    expected = key.get_secret_value().encode()
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected)


UNAUTHORIZED = ApiError(
    ErrorType.UNAUTHORIZED,
    "missing or wrong API key (Authorization: Bearer <key>)",
    headers={"WWW-Authenticate": "Bearer"},
)
