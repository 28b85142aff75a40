"""The web dashboard under /ui/: server-rendered pages, a vendored htmx for live parts.

Nothing is built and nothing is fetched from the internet: templates and static files ship as
package data (see docs/dashboard.md).
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

from openhtc.ui.routes import UI_PREFIX, create_router, templates


def install(app: FastAPI) -> None:
    """Mount the dashboard's pages and static files on ``app``."""
    app.state.ui_templates = templates()
    app.include_router(create_router())
    static = files("openhtc.ui").joinpath("static")
    app.mount(f"{UI_PREFIX}/static", StaticFiles(directory=str(static)), name="ui-static")
