"""Structured heads: logits in, logits out. Each registers a short name in ``HEADS``."""

from app.crf_heads.base import HEADS, StructuredHead, create_head
from app.crf_heads.convcrf import ConvCRF
from app.crf_heads.message_passing import ISGMR, SGM, TRWP, MeanField, MessagePassingHead
from app.crf_heads.superpixel import LogitConsistency, SuperpixelFusion

__all__ = [
    "HEADS",
    "ISGMR",
    "SGM",
    "TRWP",
    "ConvCRF",
    "LogitConsistency",
    "MeanField",
    "MessagePassingHead",
    "StructuredHead",
    "SuperpixelFusion",
    "create_head",
]
