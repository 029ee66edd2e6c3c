"""Everything that reports on a run: routing statistics, metrics.jsonl, W&B, collapse alerts.
One small file per concern; the training loop calls them, they never drive the loop."""

from moetrain.tracking.collapse import CollapseDetector
from moetrain.tracking.metrics_file import MetricsFile
from moetrain.tracking.routing import RoutingAccumulator, expert_bias_metrics, routing_metrics
from moetrain.tracking.wandb_run import WandbRun

__all__ = [
    "CollapseDetector",
    "MetricsFile",
    "RoutingAccumulator",
    "WandbRun",
    "expert_bias_metrics",
    "routing_metrics",
]
