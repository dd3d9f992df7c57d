"""``bon-sr serve``: Best-of-N behind an OpenAI-compatible HTTP API.

    settings.py   ServeSettings: the model, per-request defaults, limits (checked up front)
    protocol.py   pydantic request/response bodies with OpenAI's field names
    service.py    request -> Job -> candidates -> decision -> ChatCompletion / Completion
    engine.py     BonEngine: one vLLM AsyncLLM with bon-sr's hook, shared by all requests
    errors.py     every error as OpenAI's {"error": {...}} object
    app.py        create_app(engine, settings) -> FastAPI (no port bound)
    cli.py        the click command: flags -> settings -> uvicorn

Nothing here is imported by ``import bon_sr``; FastAPI, uvicorn and vLLM are imported by
the modules that need them, never by this one.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BonEngine", "ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "BonEngine":
        from .engine import BonEngine

        return BonEngine
    if name == "ServeSettings":
        from .settings import ServeSettings

        return ServeSettings
    raise AttributeError(name)
