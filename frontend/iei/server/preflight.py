"""The frontend container's check of its settings before uvicorn starts its workers: an invalid
variable stops the container with one line naming it (exit status 2). create_app checks them
too, but in a worker: with several, uvicorn's supervisor restarts a worker that exits, and the
container logged the same line forever instead of stopping."""

from __future__ import annotations

from ..settings import load
from .logs import configure_logging
from .settings import ServerSettings


def main() -> None:
    configure_logging()
    load(ServerSettings)


if __name__ == "__main__":
    main()
