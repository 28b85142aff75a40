"""The FastAPI application: every route under /api/v1 and /, one error mapping."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from openhtc import __version__
from openhtc.api import errors
from openhtc.api.responses import JSONResponse
from openhtc.api.routes import auth, jobs, projects, registry, storage, system, tasks, workspace
from openhtc.services.container import Services


def create_app(services: Services) -> FastAPI:
    app = FastAPI(
        title="openhtc",
        version=__version__,
        description="Self-hosted High Throughput Computing, wire-compatible with the Rescale HTC API.",
        default_response_class=JSONResponse,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.services = services
    errors.install(app)
    api = APIRouter()
    for module in (auth, workspace, projects, tasks, jobs, registry, storage, system):
        api.include_router(module.router)
    app.include_router(api, prefix="/api/v1")
    app.include_router(api, include_in_schema=False)
    return app
