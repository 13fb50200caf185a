"""The frontend container's check of its settings before uvicorn starts its workers: an invalid
variable stops the container with one line naming it (exit status 2). create_app checks them
too, but in a worker: with several, uvicorn's supervisor restarts a worker that exits, and the
container logged the same line forever instead of stopping."""

from __future__ import annotations

from pydantic import field_validator

from ..settings import MAX_WORKERS, auto_or_count, load, setting
from .logs import configure_logging
from .settings import ServerSettings


class FrontendContainerSettings(ServerSettings):
    """The server's settings and IEI_WORKERS, which the container's command hands to uvicorn,
    checked as `iei serve` checks it (uvicorn took `--workers 0`, or said only that `two` is
    not an integer)."""

    workers: str = setting("workers")

    @field_validator("workers", mode="before")
    @classmethod
    def _check_workers(cls, value: object) -> object:
        return auto_or_count(value, MAX_WORKERS) if isinstance(value, str) else value


def main() -> None:
    configure_logging()
    load(FrontendContainerSettings)


if __name__ == "__main__":
    main()
