"""Function API: prune any ``nn.Module`` at initialization with RANP or a baseline (thesis Fig. 5.2).

``prune_at_init`` = :func:`analyze_model` (one traced forward pass for the channel graph and the
resource table, then Alg. 5 over ``n_batches`` batches) + :meth:`PruningAnalysis.select` (Eq. 5.9-5.11,
or Alg. 6 when no sparsity is given) + :func:`apply_selection` (surgery and the resource table after).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from app.pruning.graph import ChannelGraph, trace_channel_graph
from app.pruning.importance import (
    IMPORTANCE_KINDS,
    REDUCTIONS,
    ParameterMaskGradients,
    parameter_mask_gradients,
)
from app.pruning.resources import ResourceTable, measure_resources
from app.pruning.reweighting import METHODS, Selection, search_max_sparsity, select
from app.pruning.surgery import INITS, channel_spec, prune_channels

__all__ = [
    "PruningAnalysis",
    "PruningReport",
    "analyze_model",
    "apply_selection",
    "prune_at_init",
    "select_checked",
]

EMPTY_LAYER_POLICIES = ("raise", "keep_top")
LossFn = Callable[[nn.Module, Any], torch.Tensor]


@contextlib.contextmanager
def _preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Restore running statistics changed by the forward passes of the analysis."""
    saved = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    try:
        yield
    finally:
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for name, value in saved.items():
                if name in buffers and buffers[name].shape == value.shape:
                    buffers[name].copy_(value)


def _check_options(method: str, importance: str, reduction: str, lam: float, on_empty_layer: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if importance not in IMPORTANCE_KINDS:
        raise ValueError(f"importance must be one of {IMPORTANCE_KINDS}, got {importance!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    if on_empty_layer not in EMPTY_LAYER_POLICIES:
        raise ValueError(f"on_empty_layer must be one of {EMPTY_LAYER_POLICIES}, got {on_empty_layer!r}")


def _check_sparsity(sparsity: float | None) -> None:
    if sparsity is None:
        return
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")


@dataclass
class PruningAnalysis:
    """Everything selection needs, computed once per model: the channel graph (ignored layers fixed),
    the parameter mask gradients (Alg. 5 lines 1-6), the full model's resource table and the first
    batch (used to check the pruned model and measure it)."""

    graph: ChannelGraph
    gradients: ParameterMaskGradients
    resources: ResourceTable
    loss_fn: LossFn
    batch: Any

    def select(
        self,
        method: str = "ranp_f",
        sparsity: float = 0.5,
        importance: str = "mpmg",
        reduction: str = "sum",
        lam: float = 11.0,
        seed: int = 0,
        keep_top: bool = False,
    ) -> Selection:
        """Neuron selection with one of ``METHODS`` (``sparsity`` is a parameter sparsity for ``snip``)."""
        _check_options(method, importance, reduction, lam, "raise")
        _check_sparsity(sparsity)
        return select(
            method,
            self.graph,
            self.gradients,
            sparsity,
            importance,
            reduction,
            self.resources,
            lam,
            seed,
            keep_top,
        )

    def zero_gradient_layers(self) -> list[str]:
        """Prunable layers whose weights get no gradient from the loss at initialization: all their neurons
        have importance 0 (Eq. 5.6-5.8), so every method removes them first."""
        return [name for name in self.graph.prunable_layers() if not self.gradients.absolute[name].any()]

    def max_sparsity(
        self,
        method: str = "ranp_f",
        importance: str = "mpmg",
        reduction: str = "sum",
        lam: float = 11.0,
        seed: int = 0,
        tol: float = 1e-4,
    ) -> float:
        """Largest sparsity that keeps a neuron in every layer, by Alg. 6."""
        _check_options(method, importance, reduction, lam, "raise")

        def selector(kappa: float) -> Selection:
            return self.select(method, kappa, importance, reduction, lam, seed, keep_top=False)

        return search_max_sparsity(selector, tol)


@dataclass
class PruningReport:
    """Result of pruning: resources before / after, kept neurons per layer and the channel spec."""

    method: str
    requested_sparsity: float
    sparsity: float
    before: ResourceTable
    after: ResourceTable
    kept: dict[str, tuple[int, int]]
    channel_spec: dict[str, int]
    max_sparsity: float | None = None
    repaired_layers: list[str] = field(default_factory=list)

    def reductions(self) -> dict[str, float]:
        """Reduction in percent of parameters, FLOPs and memory (the arrows of Table 5.2)."""

        def pct(before: float, after: float) -> float:
            return 100.0 * (1.0 - after / before) if before else 0.0

        return {
            "params": pct(self.before.params, self.after.params),
            "flops": pct(self.before.flops, self.after.flops),
            "memory": pct(self.before.memory_bytes, self.after.memory_bytes),
        }

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly summary."""
        return {
            "method": self.method,
            "requested_sparsity": self.requested_sparsity,
            "sparsity": self.sparsity,
            "max_sparsity": self.max_sparsity,
            "before": self.before.totals(),
            "after": self.after.totals(),
            "reduction_pct": self.reductions(),
            "kept": {name: list(v) for name, v in self.kept.items()},
            "repaired_layers": list(self.repaired_layers),
        }

    def markdown(self) -> str:
        """Resource totals before / after and the retained neurons per layer, as markdown."""
        b, a, r = self.before.totals(), self.after.totals(), self.reductions()
        lines = [
            f"RANP ({self.method}): neuron sparsity {100 * self.sparsity:.2f}% "
            f"(requested {100 * self.requested_sparsity:.2f}%)",
            "",
            "| | params (MB) | GFLOPs | memory (MB) |",
            "| --- | ---: | ---: | ---: |",
            f"| full | {b['params_mb']:.3f} | {b['gflops']:.3f} | {b['memory_mb']:.2f} |",
            f"| pruned | {a['params_mb']:.3f} | {a['gflops']:.3f} | {a['memory_mb']:.2f} |",
            f"| reduction | {r['params']:.1f}% | {r['flops']:.1f}% | {r['memory']:.1f}% |",
            "",
            "| layer | kept | total |",
            "| --- | ---: | ---: |",
        ]
        lines += [f"| {name} | {k} | {t} |" for name, (k, t) in self.kept.items()]
        return "\n".join(lines)


def analyze_model(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn,
    n_batches: int | None = None,
    ignored_layers: Sequence[str] = (),
    progress: bool = False,
) -> PruningAnalysis:
    """Trace the channel graph, measure resources and accumulate importance (Alg. 5 lines 1-6).

    Args:
        model: any module.
        batches: iterable of batches for ``loss_fn``; the first one is also traced and measured.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; must call ``model``.
        n_batches: use at most this many batches (default all).
        ignored_layers: module names whose neurons are never pruned (containers cover their children).
        progress: show a progress bar over the importance batches.

    Running statistics of the model are restored afterwards; its parameters are untouched.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise ValueError("loss_fn must be callable as loss_fn(model, batch)")
    if n_batches is not None and n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    if isinstance(ignored_layers, str):
        raise ValueError("ignored_layers must be a sequence of module names, not a string")
    names = {name for name, _ in model.named_modules()}
    unknown = [name for name in ignored_layers if name not in names]
    if unknown:
        raise ValueError(f"ignored layers {unknown} are not modules of the model")
    taken = []
    for batch in batches:
        if n_batches is not None and len(taken) >= n_batches:
            break
        taken.append(batch)
    if not taken:
        raise ValueError("batches is empty: at least one batch is needed to compute neuron importance")

    traced: dict[str, ChannelGraph] = {}

    def run_traced(m: nn.Module) -> None:
        traced["graph"] = trace_channel_graph(m, lambda mm: loss_fn(mm, taken[0]))

    with _preserved_buffers(model):
        resources = measure_resources(model, run_traced)
        graph = traced["graph"].with_fixed_layers(list(ignored_layers))
        if not graph.prunable_layers():
            raise ValueError(
                "the model has no prunable layer: no conv / transposed conv / linear layer with a removable "
                f"output channel was found (traced layers: {list(graph.layers) or 'none'})"
            )
        gradients = parameter_mask_gradients(
            model, taken, loss_fn, layers=list(graph.layers), progress=progress
        )
    analysis = PruningAnalysis(
        graph=graph, gradients=gradients, resources=resources, loss_fn=loss_fn, batch=taken[0]
    )
    zero = analysis.zero_gradient_layers()
    if zero:
        warnings.warn(_zero_gradient_hint(zero), stacklevel=2)
    return analysis


def _zero_gradient_hint(layers: list[str]) -> str:
    return (
        f"the loss has no gradient with respect to the weights of {layers} at initialization, so their "
        "neurons all have importance 0 and are pruned first; a normalisation layer initialised to zero "
        "after them does this (timm's residual blocks with zero_init_last=True, for instance): build the "
        "model without it, or keep these layers with ignored_layers"
    )


def apply_selection(
    model: nn.Module, analysis: PruningAnalysis, selection: Selection, init: str = "glorot"
) -> PruningReport:
    """Prune ``model`` (the analysed model or a deep copy of it) to ``selection`` and measure it again.

    Raises:
        ValueError: the selection leaves a layer without neurons.
        RuntimeError: the pruned model fails its forward pass (an operation the tracer could not see).
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if not selection.feasible:
        raise ValueError(f"the selection removes every neuron of layers {selection.empty_layers}")
    kept = prune_channels(model, analysis.graph, selection.kept_groups, init)
    with _preserved_buffers(model):
        try:
            after = measure_resources(model, lambda m: analysis.loss_fn(m, analysis.batch))
        except RuntimeError as err:
            raise RuntimeError(
                f"the pruned model failed its forward pass ({err}); an operation coupling channels was not "
                "traced: add the layers around it to ignored_layers"
            ) from err
    return PruningReport(
        method=selection.method,
        requested_sparsity=selection.requested,
        sparsity=selection.sparsity,
        before=analysis.resources,
        after=after,
        kept=kept,
        channel_spec=channel_spec(model),
        repaired_layers=list(selection.repaired_layers),
    )


def select_checked(
    analysis: PruningAnalysis,
    method: str,
    sparsity: float | None,
    importance: str = "mpmg",
    reduction: str = "sum",
    lam: float = 11.0,
    seed: int = 0,
    on_empty_layer: str = "raise",
) -> tuple[Selection, float | None]:
    """Select at ``sparsity`` (or at the Alg. 6 maximum when ``None``); raise if a layer is emptied.

    Returns:
        The selection and the Alg. 6 maximum sparsity when it was searched (else ``None``).
    """
    _check_options(method, importance, reduction, lam, on_empty_layer)
    _check_sparsity(sparsity)
    max_sparsity = None
    if sparsity is None:
        max_sparsity = analysis.max_sparsity(method, importance, reduction, lam, seed)
        sparsity = max_sparsity
    selection = analysis.select(
        method, sparsity, importance, reduction, lam, seed, on_empty_layer == "keep_top"
    )
    if not selection.feasible:
        max_sparsity = analysis.max_sparsity(method, importance, reduction, lam, seed)
        zero = sorted(set(selection.empty_layers) & set(analysis.zero_gradient_layers()))
        raise ValueError(
            f"sparsity {sparsity} removes every neuron of layer(s) {selection.empty_layers} with method "
            f"{method!r}; the largest feasible sparsity (Alg. 6) is {max_sparsity:.4f} "
            "(or use on_empty_layer='keep_top')" + (f". Note: {_zero_gradient_hint(zero)}" if zero else "")
        )
    return selection, max_sparsity


def prune_at_init(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn,
    sparsity: float | None = 0.5,
    method: str = "ranp_f",
    importance: str = "mpmg",
    reduction: str = "sum",
    lam: float = 11.0,
    n_batches: int | None = None,
    ignored_layers: Sequence[str] = (),
    init: str = "glorot",
    on_empty_layer: str = "raise",
    seed: int = 0,
    progress: bool = True,
) -> PruningReport:
    """Prune ``model`` in place at initialization (thesis Alg. 5, Fig. 5.2).

    Args:
        model: any module (its neuron layers: conv 1d/2d/3d, transposed conv, linear).
        batches: iterable of batches; ``loss_fn(model, batch)`` must return a scalar loss.
        loss_fn: the training loss as a function of the model and a batch.
        sparsity: neuron sparsity in [0, 1) (a parameter sparsity for ``method="snip"``); ``None`` uses
            the largest feasible one found by Alg. 6.
        method: ``ranp_f``, ``ranp_m``, ``vanilla``, ``weighted``, ``random``, ``layerwise`` or ``snip``.
        importance: ``mpmg`` or ``mnmg`` (Sec. 5.4.1); reduction: ``sum``, ``mean`` or ``max``.
        lam: the coefficient lambda of Eq. (5.10).
        n_batches: batches used for importance (default: all of ``batches``).
        ignored_layers: module names whose neurons are kept.
        init: ``glorot`` re-initialises the slim network (as the thesis), ``keep`` keeps weights.
        on_empty_layer: ``raise`` (the error names the layer and the largest feasible sparsity) or
            ``keep_top`` (an emptied layer keeps its best neuron).
        seed: seeds random NP and the re-initialisation (global RNG state is left untouched).
        progress: show a progress bar over the importance batches.

    Returns:
        :class:`PruningReport` with the resource tables before and after and kept neurons per layer.
    """
    _check_options(method, importance, reduction, lam, on_empty_layer)
    _check_sparsity(sparsity)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    analysis = analyze_model(model, batches, loss_fn, n_batches, ignored_layers, progress)
    selection, max_sparsity = select_checked(
        analysis, method, sparsity, importance, reduction, lam, seed, on_empty_layer
    )
    devices = [p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        report = apply_selection(model, analysis, selection, init)
    report.max_sparsity = max_sparsity
    return report
