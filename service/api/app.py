"""The FastAPI app: its state, its routes and error handlers, and its lifespan.

The model loads in a background thread, so /health answers at once; the engine makes itself ready
(Engine.start, after its warm-up), and /health/ready follows it. Shutdown stops the engine once
uvicorn has let the running requests finish.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.api.error_handlers import install_error_handlers
from service.api.routes import router
from service.api.state import ServiceState
from service.engine import Engine
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings

log = logging.getLogger(__name__)


def create_app(settings: ServiceSettings, engine: Engine | None = None, *,
               on_load_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    """An app serving `engine`, or loading one from `settings` in the background when it is None
    (`on_load_failure` hears of a load that failed, e.g. to stop the server)."""
    metrics = engine.metrics if engine is not None else ServiceMetrics(settings.model_name)
    app = FastAPI(title="vlkit service", lifespan=_lifespan, docs_url=None, redoc_url=None)
    app.state.service = ServiceState(settings, engine, metrics, on_load_failure)
    install_error_handlers(app, metrics)
    if settings.cors_origins:  # vLLM's CORS middleware, with its defaults: any method and header, no credentials
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.include_router(router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    state: ServiceState = app.state.service
    if state.engine is None:
        threading.Thread(target=_load, args=(state,), name="vlkit-load", daemon=True).start()
    else:
        if not state.engine.ready:
            await asyncio.to_thread(state.engine.start, warmup=state.settings.warmup)
        state.started = True
    yield
    if state.engine is not None:
        await asyncio.to_thread(state.engine.stop)


def _load(state: ServiceState) -> None:
    settings = state.settings
    try:
        engine = Engine.load(settings, state.metrics)
        state.engine = engine  # not ready yet: requests get 503 until Engine.start has warmed it up
        engine.start(warmup=settings.warmup)
        state.started = True
        log.info("ready: %s (max context %d)", settings.model_name, engine.max_model_len)
    except BaseException as exc:  # noqa: BLE001 - reported on /health/ready and to the launcher
        state.load_error = f"The model failed to load: {exc}"
        log.error("%s", state.load_error)
        if state.on_load_failure is not None:
            state.on_load_failure(exc)
