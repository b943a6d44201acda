"""Drive a serving engine (or the HTTP API) with concurrent streaming requests and time them.

The engine's own API is wired in by the caller: ``open_stream(index)`` starts request ``index`` and
returns an iterator that yields once per generated token (token ids, text chunks or SSE chunks: one
item per token). Works the same for ``service``'s engine and for the openai SDK against the server.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from statistics import median
from typing import Any, Callable, Iterable, Iterator


@dataclass
class StreamResult:
    ttft_s: float  # request start to first token
    total_s: float  # request start to last token
    tokens: int


@dataclass
class ConcurrencyResult:
    concurrency: int
    wall_s: float
    results: list[StreamResult]

    @property
    def aggregate_tok_s(self) -> float:
        """All generated tokens over the wall time of the whole burst."""
        return sum(r.tokens for r in self.results) / self.wall_s

    @property
    def decode_tok_s_per_stream(self) -> float:
        """Median per-stream decode rate: tokens after the first over the time after the first."""
        rates = [(r.tokens - 1) / (r.total_s - r.ttft_s) for r in self.results if r.tokens > 1 and r.total_s > r.ttft_s]
        return median(rates) if rates else 0.0

    @property
    def median_ttft_s(self) -> float:
        return median(r.ttft_s for r in self.results)


def engine_token_stream(engine, request, handles: list | None = None) -> Iterator[None]:
    """Submit `request` to a service engine and yield once per generated token (its handle is appended
    to `handles`, for the token ids)."""
    handle = engine.submit(request)
    if handles is not None:
        handles.append(handle)
    seen = 0
    for event in handle:
        if event.error is not None:
            raise event.error
        for _ in range(len(handle.token_ids) - seen):
            yield
        seen = len(handle.token_ids)


def _timed(open_stream: Callable[[int], Iterable[Any]], index: int) -> StreamResult:
    start = time.perf_counter()
    first, tokens = None, 0
    stream: Iterator[Any] = iter(open_stream(index))
    for _ in stream:
        tokens += 1
        if first is None:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    return StreamResult(ttft_s=first if first is not None else total, total_s=total, tokens=tokens)


def measure_streams(open_stream: Callable[[int], Iterable[Any]], concurrency: int) -> ConcurrencyResult:
    """Start ``concurrency`` requests at once (one thread each) and time every stream."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        start = time.perf_counter()
        results = list(pool.map(lambda i: _timed(open_stream, i), range(concurrency)))
        wall = time.perf_counter() - start
    return ConcurrencyResult(concurrency=concurrency, wall_s=wall, results=results)


def engine_rows(open_stream: Callable[[int], Iterable[Any]], concurrencies: Iterable[int] = (1, 4, 8),
                warmup: bool = True) -> list[tuple[str, str]]:
    """Table rows (metric, value) for an engine: TTFT, per-stream decode and aggregate tok/s per concurrency."""
    if warmup:
        measure_streams(open_stream, 1)
    rows = []
    for n in concurrencies:
        r = measure_streams(open_stream, n)
        rows.append((f"engine, {n} concurrent: median TTFT", f"{r.median_ttft_s:.3f} s"))
        rows.append((f"engine, {n} concurrent: decode per stream / aggregate",
                     f"{r.decode_tok_s_per_stream:.0f} / {r.aggregate_tok_s:.0f} tok/s"))
    return rows
