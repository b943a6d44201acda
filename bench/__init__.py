"""Benchmarks of the 8gb profile's decode path: ``python -m bench --help`` (docs/BENCHMARKS.md).

Imports nothing that needs the service's web stack (FastAPI, pydantic-settings): the GPU machine
runs it with torch + transformers only.
"""
