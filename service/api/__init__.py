"""The HTTP layer: vLLM's OpenAI-compatible routes over the engine (FastAPI).

Routes: POST /v1/chat/completions, POST /v1/completions, POST /tokenize, POST /detokenize, GET /v1/models,
GET /version, GET /health, GET /health/ready, GET /metrics.
A chat request goes routes.py (parse) -> serving.py (checks, images, prompt) -> cancellation.py
(submit, send the answer, cancel the handle however it ends) -> sse.py for a streamed answer.
"""
from service.api.app import create_app

__all__ = ["create_app"]
