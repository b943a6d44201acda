"""vlkit's 8gb profile: an OpenAI-compatible Qwen3-VL service on transformers + FastAPI.

Importing this package must stay light (no torch): the host CLI reads ``service.settings``.
"""
