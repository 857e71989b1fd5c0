"""Metrics torchmetrics lacks. Stands beside the other subpackages and imports none of them."""

from app.metrics.edges import EdgeMetrics, edge_match_counts, label_edges, within_tolerance

__all__ = ["EdgeMetrics", "edge_match_counts", "label_edges", "within_tolerance"]
