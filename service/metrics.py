"""Prometheus metrics of one service instance (own registry, so several can live in one process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vlkit_requests", "Finished chat completions by finish reason", ["finish_reason"], registry=r)
        self.errors = Counter("vlkit_request_errors", "Failed requests by error kind", ["kind"], registry=r)
        self.queue_depth = Gauge("vlkit_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("vlkit_running_requests", "Requests in the running batch", registry=r)
        self.prompt_tokens = Counter("vlkit_prompt_tokens", "Prompt tokens processed (text + image)", registry=r)
        self.generation_tokens = Counter("vlkit_generation_tokens", "Tokens generated", registry=r)
        self.prefix_cache_hits = Counter("vlkit_prefix_cache_hit_tokens",
                                         "Prompt tokens taken from the prefix cache instead of computed", registry=r)
        self.ttft = Histogram("vlkit_time_to_first_token_seconds", "Time from arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("vlkit_request_latency_seconds", "Time from arrival to the last token",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("vlkit_batch_size", "Rows per decode step", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
                                    registry=r)
        self.ready = Gauge("vlkit_ready", "1 once the model is loaded and warmed up", registry=r)
        r.register(_GpuMemoryCollector())


class _GpuMemoryCollector:
    """Torch's CUDA allocator figures, read at scrape time (nothing when there is no GPU)."""

    def collect(self):
        import torch

        family = GaugeMetricFamily("vlkit_gpu_memory_bytes", "GPU memory of this process (torch allocator)",
                                   labels=["kind"])
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            family.add_metric(["allocated"], torch.cuda.memory_allocated())
            family.add_metric(["reserved"], torch.cuda.memory_reserved())
            family.add_metric(["peak_allocated"], torch.cuda.max_memory_allocated())
            free, total = torch.cuda.mem_get_info()
            family.add_metric(["device_used"], total - free)
            family.add_metric(["device_total"], total)
        yield family
