"""Prometheus metrics: one registry per app, every name prefixed ``anytime_``, base units.

Latencies are histograms (aggregatable across replicas, the first complaint users have
about Triton's and TorchServe's summaries).  ``model`` is the served model's name,
``rung`` the rung that served the request: for ARM, whose requests mix rungs per patch,
the rung that covered the most patches (``anytime_patches_total`` has the full mix).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
BUDGET_BUCKETS = tuple(round(0.05 * i, 2) for i in range(21))
PSNR_BUCKETS = tuple(float(v) for v in range(20, 46))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """All metrics of one server; ``registry`` is what GET /metrics exposes."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.request_seconds = Histogram(
            "anytime_request_duration_seconds", "End-to-end server time of an inference request "
            "(arrival to response ready)", ["model", "rung"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram(
            "anytime_queue_duration_seconds", "Time an admitted request waited for the model's worker",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram(
            "anytime_compute_duration_seconds", "Network time of a request on the worker",
            ["model", "rung"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter(
            "anytime_requests", "Requests answered, by endpoint and status code", ["endpoint", "model", "code"],
            registry=r)
        self.shed = Counter(
            "anytime_shed", "Requests rejected at once instead of being served late "
            "(reason: deadline, late_start, queue_full, draining, not_ready)", ["model", "reason"], registry=r)
        self.deadline_met = Counter(
            "anytime_deadline_met", "Requests with a deadline whose 200 response left the server (last byte "
            "sent) within it", ["model"], registry=r)
        self.deadline_missed = Counter(
            "anytime_deadline_missed", "Requests with a deadline answered 200 after it (last byte sent) or 504",
            ["model"], registry=r)
        self.shed_responses = Counter(
            "anytime_shed_responses", "429 and 503 responses by when their last byte was sent: before_deadline, "
            "after_deadline or no_deadline", ["model", "code", "when"], registry=r)
        self.cancelled = Counter(
            "anytime_cancelled", "Requests whose client closed the connection before the answer (stage: queued, "
            "its work dropped; running, its work finished unread)", ["model", "stage"], registry=r)
        self.queue_depth = Gauge("anytime_queue_depth", "Requests admitted and waiting for the worker",
                                 ["model"], registry=r)
        self.inflight = Gauge("anytime_inflight_requests", "Requests between arrival and response",
                              ["model"], registry=r)
        self.predicted_wait = Gauge("anytime_predicted_wait_seconds", "Predicted time until the worker could "
                                    "start a newly admitted request", ["model"], registry=r)
        self.budget = Histogram("anytime_budget_chosen", "Budget (fraction of full-cost FLOPs) chosen per request",
                                ["model"], buckets=BUDGET_BUCKETS, registry=r)
        self.degraded = Counter("anytime_degraded", "Requests the planner served below the top budget because "
                                "their deadline and the load left no time for it (quality given up; the "
                                "autoscaler's signal, deploy/k8s/keda)", ["model"], registry=r)
        self.flops = Counter("anytime_flops_served", "FLOPs spent on served requests", ["model"], registry=r)
        self.predicted_patch_psnr = Histogram("anytime_predicted_patch_psnr_decibels", "The Edge-to-PSNR table's "
                                              "patch-level quality of served super-resolution requests (PSNR of the "
                                              "mean predicted patch MSE; not the image's PSNR: docs/ARM.md)",
                                              ["model"], buckets=PSNR_BUCKETS, registry=r)
        self.expected_accuracy = Histogram("anytime_expected_accuracy_ratio", "Held-out accuracy of the rung that "
                                           "served a classification request (CF-ViT: at its eta on the validation "
                                           "curve)", ["model"], buckets=BUDGET_BUCKETS, registry=r)
        self.exits = Counter("anytime_exits", "CF-ViT requests by the stage they left at (coarse, fine)",
                             ["model", "stage"], registry=r)
        self.patches = Counter("anytime_patches", "Patches served, by rung", ["model", "rung"], registry=r)
        self.batch_items = Histogram("anytime_batch_items", "Items per forward pass (micro-batches merge "
                                     "requests that share a rung)", ["model", "rung"], buckets=BATCH_BUCKETS,
                                     registry=r)
        self.slowdown = Gauge("anytime_slowdown_ratio", "EWMA of observed over predicted compute time "
                              "(above 1: the host runs slower than calibrated)", ["model"], registry=r)
        self.rung_item_seconds = Gauge("anytime_rung_item_seconds", "Predicted seconds per item at each rung "
                                       "(calibrated at start-up, refreshed by observation)", ["model", "rung"],
                                       registry=r)
        self.cpu = Gauge("anytime_cpu_utilization_ratio", "CPU utilisation in [0, 1] (scope: system, process; "
                         "process is normalised by the cores available)", ["scope"], registry=r)
        self.gpu = Gauge("anytime_gpu_utilization_ratio", "GPU utilisation in [0, 1] (NVML)", ["device"],
                         registry=r)
        self.gpu_memory = Gauge("anytime_gpu_memory_used_bytes", "GPU memory in use", ["device"], registry=r)
        self.ready = Gauge("anytime_ready", "1 once the model is warmed up and calibrated, 0 while warming "
                           "or draining", ["model"], registry=r)
