"""Prometheus metrics of one service instance (own registry, so several can live in one process).

The series vLLM's server exports (vllm/v1/metrics/loggers.py: the same names, types, buckets and
`model_name` / `engine` labels), so that one dashboard (docs/grafana/vlkit.json) serves both
profiles; and a few of vlkit's own, under vlkit_, that vLLM has no series for: errors by kind, rows
per decode step, GPU memory as torch's allocator sees it, readiness.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

# vLLM's buckets (v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
LABELS = ("model_name", "engine")
ENGINE = "0"  # one engine per process, as vLLM labels its first
# The engine's finish reasons -> vLLM's finished_reason label values (FinishReason).
FINISHED_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}
VLLM_FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")  # vLLM's FINISH_REASON_STRINGS


class _FinishedRequests:
    """vllm:request_success_total by finished_reason (a cancelled request is vLLM's "abort")."""

    def __init__(self, counter: Counter, model_name: str):
        self._counter, self._model = counter, model_name

    def labels(self, reason: str):
        return self._counter.labels(self._model, ENGINE, FINISHED_REASONS.get(reason, reason))


class ServiceMetrics:
    def __init__(self, model_name: str = "") -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r, own = self.registry, (model_name, ENGINE)

        def labelled(metric):
            return metric.labels(*own)

        self.running = labelled(Gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                                      LABELS, registry=r))
        self.queue_depth = labelled(Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                                          LABELS, registry=r))
        self.kv_cache_usage = labelled(Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                                             LABELS, registry=r))
        self.prefix_cache_queries = labelled(Counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", LABELS,
            registry=r))
        self.prefix_cache_hits = labelled(Counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", LABELS, registry=r))
        self.prompt_tokens = labelled(Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", LABELS,
                                              registry=r))
        self.generation_tokens = labelled(Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                                  LABELS, registry=r))
        self.requests = _FinishedRequests(Counter("vllm:request_success", "Count of successfully processed requests.",
                                                  (*LABELS, "finished_reason"), registry=r), model_name)
        self.ttft = labelled(Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                                       LABELS, buckets=TTFT_BUCKETS, registry=r))
        self.inter_token = labelled(Histogram("vllm:inter_token_latency_seconds",
                                              "Histogram of inter-token latency in seconds.", LABELS,
                                              buckets=ITL_BUCKETS, registry=r))
        self.latency = labelled(Histogram("vllm:e2e_request_latency_seconds",
                                          "Histogram of e2e request latency in seconds.", LABELS,
                                          buckets=E2E_BUCKETS, registry=r))
        # vlkit's own.
        self.errors = Counter("vlkit_request_errors", "Failed requests by error kind", ["kind"], registry=r)
        self.batch_size = Histogram("vlkit_batch_size", "Rows per decode step", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
                                    registry=r)
        self.ready = Gauge("vlkit_ready", "1 once the model is loaded and warmed up", registry=r)
        for reason in VLLM_FINISHED_REASONS:  # present from the start, as vLLM's are (it makes one of each)
            self.requests.labels(reason)
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
