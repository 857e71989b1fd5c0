"""Structured heads: logits in, logits out. Each registers a short name in ``HEADS``."""

from app.crf_heads.base import HEADS, StructuredHead, create_head
from app.crf_heads.convcrf import ConvCRF

__all__ = ["HEADS", "ConvCRF", "StructuredHead", "create_head"]
