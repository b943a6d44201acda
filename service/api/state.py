"""What the routes share: settings, metrics, the serving layer, and the engine once it is loaded."""
from __future__ import annotations

from typing import Callable

from service.api.completions import CompletionServing
from service.api.serving import ChatServing
from service.api.tokenization import Tokenization
from service.engine import Engine
from service.errors import Unavailable
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings


class ServiceState:
    def __init__(self, settings: ServiceSettings, engine: Engine | None, metrics: ServiceMetrics,
                 on_load_failure: Callable[[BaseException], None] | None = None):
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.serving = ChatServing(settings, metrics)
        self.completions = CompletionServing(self.serving, metrics)
        self.tokenization = Tokenization(self.serving)
        self.on_load_failure = on_load_failure
        self.load_error: str | None = None
        self.started = False  # the engine loaded and Engine.start returned; stays True through the shutdown


    @property
    def ready(self) -> bool:
        """Loaded, and started by Engine.start (which makes it ready once its warm-up has passed)."""
        return self.engine is not None and self.engine.ready

    def ready_engine(self) -> Engine:
        if not self.ready:
            raise Unavailable(self.load_error or "The model is still loading; retry when /health/ready says ready.")
        return self.engine
