"""Builds the FastAPI application of a node. Routes are added here as capabilities arrive;
today: ``$validate``."""

from __future__ import annotations

from fastapi import FastAPI

from ncp import __version__
from ncp.validation.api import router as validation_router


def build_app() -> FastAPI:
    app = FastAPI(title="ncp", version=__version__, docs_url=None, redoc_url=None)
    app.include_router(validation_router())
    return app
