"""Structured heads: logits in, logits out. Each registers a short name in ``HEADS``."""

from app.crf_heads.base import HEADS, StructuredHead, create_head

__all__ = ["HEADS", "StructuredHead", "create_head"]
