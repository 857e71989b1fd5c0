"""Reweighting and neuron selection (thesis Sec. 5.4.2-5.4.4, Alg. 5 lines 8-12, Alg. 6) and baselines.

* vanilla NP: global threshold on the vanilla importance (MPMG-sum by default, Eq. 5.11);
* weighted NP: layer balancing first (Eq. 5.9);
* RANP-f / RANP-m: balancing, then resource reweighting with the FLOPs / memory of each layer
  (Eq. 5.10, 5.12);
* random NP: the global threshold on random scores;
* layer-wise NP: the same retain rate in every layer, most important neurons first;
* SNIP NP: SNIP parameter pruning (Eq. 5.2) at a *parameter* sparsity, then a neuron is kept iff one
  of its incoming parameters survives (sparse filters made dense).

Selection works on the channel groups of a :class:`~app.pruning.graph.ChannelGraph`: a group is kept
when its best member neuron is kept, fixed groups (model outputs, ignored layers, untraceable channels)
are always kept, and the sparsity counts removed neurons over all neurons of the neuron layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from app.pruning.graph import ChannelGraph
from app.pruning.importance import ParameterMaskGradients, neuron_importance
from app.pruning.resources import ResourceTable

__all__ = [
    "METHODS",
    "Selection",
    "balance_layers",
    "method_scores",
    "resource_importance",
    "resource_reweight",
    "search_max_sparsity",
    "select",
    "select_global",
    "select_layerwise",
    "select_snip",
]

METHODS = ("ranp_f", "ranp_m", "vanilla", "weighted", "random", "layerwise", "snip")
RESOURCES = ("flops", "memory")


@dataclass
class Selection:
    """Which channel groups survive.

    ``kept_groups`` is ``(G,)`` bool; ``kept`` / ``total`` count neurons per layer; ``sparsity`` is the
    achieved neuron sparsity; ``empty_layers`` are the layers left without a neuron (so ``feasible`` is
    ``not empty_layers``); ``repaired_layers`` are layers the rule emptied and ``keep_top`` gave back
    their best neuron; ``scores`` are the final neuron scores.
    """

    method: str
    requested: float
    kept_groups: torch.Tensor
    kept: dict[str, int]
    total: dict[str, int]
    sparsity: float
    empty_layers: list[str] = field(default_factory=list)
    repaired_layers: list[str] = field(default_factory=list)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return not self.empty_layers


def _check_sparsity(sparsity: float, what: str = "sparsity") -> None:
    if not isinstance(sparsity, (int, float)) or not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"{what} must be in [0, 1), got {sparsity!r}")


def balance_layers(scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Layer balancing, Eq. (5.9): ``s~_u^l = (max_k mean(s^k) / mean(s^l)) s_u^l``.

    Args:
        scores: ``{layer: (N_l,)}`` non-negative importance.

    Returns:
        Scores with the same mean in every layer; a layer whose scores are all zero stays zero.
    """
    means = {name: float(s.float().mean()) for name, s in scores.items()}
    top = max(means.values())
    return {
        name: s * (top / means[name]) if means[name] > 0 else torch.zeros_like(s)
        for name, s in scores.items()
    }


def resource_importance(table: ResourceTable, layers: list[str], resource: str = "flops") -> dict[str, float]:
    """Resource importance ``tau_l`` of each layer, Eq. (5.12): FLOPs (5.12a) or output size (5.12b)."""
    if resource not in RESOURCES:
        raise ValueError(f"resource must be one of {RESOURCES}, got {resource!r}")
    out = {}
    for name in layers:
        row = table.layer(name)
        out[name] = float(row.flops if resource == "flops" else row.output_elements) / table.batch_size
    return out


def resource_reweight(
    scores: Mapping[str, torch.Tensor], tau: Mapping[str, float], lam: float = 11.0
) -> dict[str, torch.Tensor]:
    """Resource reweighting, Eq. (5.10): ``s^_u^l = (1 + lam * softmax(-tau)_l) s~_u^l``.

    ``tau`` is divided by its maximum over the layers first, so the softmax sees values in ``(0, 1]``
    whatever the unit (raw FLOPs would make it one-hot on the cheapest layer).
    """
    if lam <= 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    missing = [name for name in scores if name not in tau]
    if missing:
        raise ValueError(f"no resource importance for layers {missing}")
    names = list(scores)
    values = torch.tensor([tau[n] for n in names], dtype=torch.float64)
    scale = float(values.max()) if float(values.max()) > 0 else 1.0
    weights = 1.0 + lam * torch.softmax(-values / scale, dim=0)
    return {n: scores[n] * float(w) for n, w in zip(names, weights)}


def _group_scores(graph: ChannelGraph, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``(G,)`` score of each group: the best of its member neurons; +inf for fixed or empty groups."""
    g = torch.full((graph.n_groups,), -math.inf, dtype=torch.float64)
    for name, layer in graph.layers.items():
        s = scores[name].detach().to(torch.float64).cpu()
        if s.numel() != len(layer.out_groups):
            raise ValueError(f"layer {name!r} has {len(layer.out_groups)} neurons but {s.numel()} scores")
        g.scatter_reduce_(0, torch.tensor(layer.out_groups), s, reduce="amax")
    g[graph.fixed_mask()] = math.inf
    g[graph.group_sizes() == 0] = math.inf
    return g


def _finish(
    method: str,
    requested: float,
    graph: ChannelGraph,
    kept_groups: torch.Tensor,
    group_score: torch.Tensor,
    keep_top: bool,
    scores: Mapping[str, torch.Tensor] | None = None,
) -> Selection:
    """Count kept neurons per layer; optionally keep the best group of each emptied layer."""
    kept_groups = kept_groups | graph.fixed_mask()
    empty = [n for n, layer in graph.layers.items() if not bool(kept_groups[layer.out_groups].any())]
    repaired = []
    if keep_top:
        for name in empty:
            groups = torch.tensor(graph.layers[name].out_groups)
            kept_groups[groups[int(torch.argmax(group_score[groups]))]] = True
        repaired, empty = empty, []
    kept = {n: int(kept_groups[layer.out_groups].sum()) for n, layer in graph.layers.items()}
    total = {n: len(layer.out_groups) for n, layer in graph.layers.items()}
    sparsity = 1.0 - sum(kept.values()) / max(sum(total.values()), 1)
    return Selection(
        method=method,
        requested=requested,
        kept_groups=kept_groups,
        kept=kept,
        total=total,
        sparsity=sparsity,
        empty_layers=empty,
        repaired_layers=repaired,
        scores=dict(scores or {}),
    )


def select_global(
    graph: ChannelGraph,
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    keep_top: bool = False,
    method: str = "global",
) -> Selection:
    """Global threshold, Eq. (5.11): remove the ``ceil(sparsity * n)`` least important neurons.

    Groups are removed in ascending order of their score until that many neurons are gone. Fixed groups
    (all output classes of the last layer included) are kept. With ``keep_top`` an emptied layer keeps
    its best neuron, otherwise it is listed in ``Selection.empty_layers``.
    """
    _check_sparsity(sparsity)
    group_score = _group_scores(graph, scores)
    sizes = graph.group_sizes()
    target = math.ceil(sparsity * graph.n_neurons - 1e-9)
    removable = torch.isfinite(group_score).nonzero().flatten()
    order = removable[torch.sort(group_score[removable], stable=True).indices]
    before = torch.cumsum(sizes[order], 0) - sizes[order]
    kept_groups = torch.ones(graph.n_groups, dtype=torch.bool)
    kept_groups[order[before < target]] = False
    return _finish(method, sparsity, graph, kept_groups, group_score, keep_top, scores)


def select_layerwise(
    graph: ChannelGraph, scores: Mapping[str, torch.Tensor], sparsity: float, keep_top: bool = False
) -> Selection:
    """Layer-wise NP: keep ``max(1, ceil((1 - sparsity) N_l))`` best neurons of every layer."""
    _check_sparsity(sparsity)
    group_score = _group_scores(graph, scores)
    kept_groups = torch.zeros(graph.n_groups, dtype=torch.bool)
    for name, layer in graph.layers.items():
        n_keep = max(1, math.ceil((1.0 - sparsity) * len(layer.out_groups) - 1e-9))
        best = torch.sort(scores[name].detach().double().cpu(), descending=True, stable=True).indices[:n_keep]
        kept_groups[torch.tensor(layer.out_groups)[best]] = True
    return _finish("layerwise", sparsity, graph, kept_groups, group_score, keep_top, scores)


def select_snip(
    graph: ChannelGraph, gradients: ParameterMaskGradients, param_sparsity: float, keep_top: bool = False
) -> Selection:
    """SNIP NP: SNIP keeps the top ``1 - param_sparsity`` parameters by ``|w dL/dw|`` (Eq. 5.2) over all
    neuron layers; a neuron survives iff one of its incoming parameters does."""
    _check_sparsity(param_sparsity, "param_sparsity")
    names = list(graph.layers)
    flat = torch.cat([gradients.absolute[n].flatten().double().cpu() for n in names])
    n_remove = math.floor(param_sparsity * flat.numel() + 1e-9)
    threshold = float(torch.kthvalue(flat, n_remove).values) if n_remove > 0 else -math.inf
    neuron_best = {n: gradients.absolute[n].double().cpu().amax(dim=1) for n in names}
    group_score = _group_scores(graph, neuron_best)
    kept_groups = torch.zeros(graph.n_groups, dtype=torch.bool)
    for name, layer in graph.layers.items():
        alive = neuron_best[name] > threshold
        kept_groups[torch.tensor(layer.out_groups)[alive]] = True
    return _finish("snip", param_sparsity, graph, kept_groups, group_score, keep_top, neuron_best)


def method_scores(
    method: str,
    gradients: ParameterMaskGradients,
    importance: str = "mpmg",
    reduction: str = "sum",
    resources: ResourceTable | None = None,
    lam: float = 11.0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Final neuron scores of a global-threshold method (all but ``snip``), Alg. 5 lines 7-10."""
    if method not in METHODS or method == "snip":
        raise ValueError(f"method must be one of {[m for m in METHODS if m != 'snip']}, got {method!r}")
    scores = neuron_importance(gradients, importance, reduction)
    if method == "random":
        generator = torch.Generator().manual_seed(seed)
        return {n: torch.rand(s.shape, generator=generator, dtype=torch.float64) for n, s in scores.items()}
    if method in ("vanilla", "layerwise"):
        return scores
    scores = balance_layers(scores)
    if method == "weighted":
        return scores
    if resources is None:
        raise ValueError(f"method {method!r} needs the resource table of the full model")
    tau = resource_importance(resources, list(scores), "flops" if method == "ranp_f" else "memory")
    return resource_reweight(scores, tau, lam)


def select(
    method: str,
    graph: ChannelGraph,
    gradients: ParameterMaskGradients,
    sparsity: float,
    importance: str = "mpmg",
    reduction: str = "sum",
    resources: ResourceTable | None = None,
    lam: float = 11.0,
    seed: int = 0,
    keep_top: bool = False,
) -> Selection:
    """Select neurons with one of :data:`METHODS` (``sparsity`` is a parameter sparsity for ``snip``)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if method == "snip":
        return select_snip(graph, gradients, sparsity, keep_top)
    scores = method_scores(method, gradients, importance, reduction, resources, lam, seed)
    if method == "layerwise":
        return select_layerwise(graph, scores, sparsity, keep_top)
    return select_global(graph, scores, sparsity, keep_top, method=method)


def search_max_sparsity(selector: Callable[[float], Selection], tol: float = 1e-4) -> float:
    """Alg. 6: bisection for the largest sparsity whose selection keeps a neuron in every layer.

    Args:
        selector: maps a sparsity to a :class:`Selection` (computed without ``keep_top``).
        tol: the threshold ``delta`` on ``kappa_max - kappa_min``.

    Returns:
        The largest feasible sparsity found (the last ``kappa_min``).
    """
    if not 0 < tol < 1:
        raise ValueError(f"tol must be in (0, 1), got {tol}")
    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if selector(mid).feasible:
            lo = mid
        else:
            hi = mid
    return lo
