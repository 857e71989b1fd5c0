"""RANP: resource-aware neuron pruning at initialization (thesis chapter 5), for any ``nn.Module``.

Typical use::

    report = prune_at_init(model, batches, loss_fn, sparsity=0.8, method="ranp_f")
    print(report.markdown())

or the Lightning callback :class:`RANP`, which prunes ``pl_module.backbone`` in ``setup``.
"""

from app.pruning.api import PruningAnalysis, PruningReport, analyze_model, apply_selection, prune_at_init
from app.pruning.callback import RANP
from app.pruning.fast_conv import conv_weight_grad, fast_conv_weight_grad, slow_weight_grad_types
from app.pruning.graph import ChannelGraph, LayerChannels, trace_channel_graph
from app.pruning.importance import ParameterMaskGradients, neuron_importance, parameter_mask_gradients
from app.pruning.resources import LayerResources, ResourceTable, measure_resources
from app.pruning.reweighting import (
    METHODS,
    Selection,
    balance_layers,
    method_scores,
    resource_importance,
    resource_reweight,
    search_max_sparsity,
    select,
    select_global,
    select_layerwise,
    select_snip,
)
from app.pruning.surgery import apply_channel_spec, channel_spec, prune_channels, reinitialize

__all__ = [
    "METHODS",
    "RANP",
    "ChannelGraph",
    "LayerChannels",
    "LayerResources",
    "ParameterMaskGradients",
    "PruningAnalysis",
    "PruningReport",
    "ResourceTable",
    "Selection",
    "analyze_model",
    "apply_channel_spec",
    "apply_selection",
    "balance_layers",
    "channel_spec",
    "conv_weight_grad",
    "fast_conv_weight_grad",
    "measure_resources",
    "method_scores",
    "neuron_importance",
    "parameter_mask_gradients",
    "prune_at_init",
    "prune_channels",
    "reinitialize",
    "resource_importance",
    "resource_reweight",
    "search_max_sparsity",
    "select",
    "select_global",
    "select_layerwise",
    "select_snip",
    "slow_weight_grad_types",
    "trace_channel_graph",
]
