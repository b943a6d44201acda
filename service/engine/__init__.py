"""The engine: Qwen3-VL loaded once, a continuous batch over a paged KV cache, no HTTP.

engine.py is the front (load, start, prepare, submit, stop); the module docstrings say the rest.
"""
from service.engine.engine import Engine
from service.engine.requests import Completion, Event, GenerationRequest, Prompt, RequestHandle
from service.engine.sampling import SamplingParams

__all__ = ["Completion", "Engine", "Event", "GenerationRequest", "Prompt", "RequestHandle", "SamplingParams"]
