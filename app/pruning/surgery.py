"""Channel surgery: make the selected network physically narrower, and rebuild it from a channel spec.

Surgery slices the parameters (and running statistics) of every neuron layer and normalisation layer
along the kept channels of a :class:`~app.pruning.graph.ChannelGraph`, in place, so the modules keep
their class, hooks and names. Depthwise convolutions shrink their ``groups`` with their channels;
a ``GroupNorm`` keeps the largest group count not above its old one that divides its new width.
Kept weights are either kept (``init="keep"``) or re-initialised with Glorot normal weights and zero
biases, norms reset to identity (``init="glorot"``), as the thesis trains the slim network from scratch.

:func:`channel_spec` exports the channel counts of a model as a flat ``{"<module>.<attr>": int}`` dict
and :func:`apply_channel_spec` gives a fresh (or differently pruned) model those shapes, so a checkpoint
of a pruned model loads into it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from app.pruning.graph import CONV_LAYERS, CONV_T_LAYERS, NEURON_LAYERS, NORM_LAYERS, ChannelGraph

__all__ = ["INITS", "apply_channel_spec", "channel_spec", "prune_channels", "reinitialize"]

INITS = ("glorot", "keep")

_SPEC_ATTRS: tuple[tuple[type | tuple[type, ...], tuple[str, ...]], ...] = (
    (CONV_LAYERS + CONV_T_LAYERS, ("in_channels", "out_channels", "groups")),
    ((nn.Linear,), ("in_features", "out_features")),
    ((nn.GroupNorm,), ("num_channels", "num_groups")),
    ((nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm), ("num_features",)),
)


def _spec_attrs(module: nn.Module) -> tuple[str, ...]:
    for types, attrs in _SPEC_ATTRS:
        if isinstance(module, types):
            return attrs
    return ()


def _new_param(old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data.detach().clone().contiguous(), requires_grad=old.requires_grad)


def _device(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        return tensor.device
    return torch.device("cpu")


def _group_count(channels: int, old_groups: int) -> int:
    """Largest divisor of ``channels`` not above ``old_groups``."""
    for g in range(min(old_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _slice_norm(module: nn.Module, keep: torch.Tensor) -> None:
    n = int(keep.numel())
    if getattr(module, "weight", None) is not None:
        module.weight = _new_param(module.weight, module.weight.data[keep])
    if getattr(module, "bias", None) is not None:
        module.bias = _new_param(module.bias, module.bias.data[keep])
    for buffer in ("running_mean", "running_var"):
        value = getattr(module, buffer, None)
        if value is not None:
            setattr(module, buffer, value[keep].clone())
    if isinstance(module, nn.GroupNorm):
        module.num_groups = _group_count(n, module.num_groups)
        module.num_channels = n
    else:
        module.num_features = n


def _slice_layer(module: nn.Module, keep_in: torch.Tensor, keep_out: torch.Tensor) -> None:
    n_in, n_out = int(keep_in.numel()), int(keep_out.numel())
    w = module.weight.data
    if isinstance(module, nn.Linear):
        module.weight = _new_param(module.weight, w[keep_out][:, keep_in])
        module.in_features, module.out_features = n_in, n_out
    else:
        groups = module.groups
        depthwise = groups > 1 and groups == module.in_channels
        if groups > 1 and not depthwise:
            if n_in != module.in_channels or n_out != module.out_channels:
                raise RuntimeError(f"grouped convolution {module} cannot lose channels")
            return
        if isinstance(module, CONV_T_LAYERS):  # weight (in, out / groups, *k)
            if depthwise:
                mult = module.out_channels // module.in_channels
                w = w[keep_in]  # (n_in, mult, *k): output block of each kept input
                module.weight = _new_param(module.weight, w)
                if n_out != n_in * mult:
                    raise RuntimeError("depthwise transposed convolution lost part of a channel block")
            else:
                module.weight = _new_param(module.weight, w[keep_in][:, keep_out])
        else:  # weight (out, in / groups, *k)
            module.weight = _new_param(module.weight, w[keep_out] if depthwise else w[keep_out][:, keep_in])
            if depthwise and n_out % max(n_in, 1) != 0:
                raise RuntimeError("depthwise convolution lost part of a channel block")
        module.in_channels, module.out_channels = n_in, n_out
        if depthwise:
            module.groups = n_in
    if module.bias is not None:
        module.bias = _new_param(module.bias, module.bias.data[keep_out])


def reinitialize(model: nn.Module, names: list[str] | None = None) -> None:
    """Glorot-normal weights and zero biases for conv / linear layers, identity for norm layers.

    Args:
        model: the module.
        names: restrict to these modules (default: every neuron and normalisation layer).
    """
    modules = dict(model.named_modules())
    targets = [modules[n] for n in names] if names is not None else list(modules.values())
    for m in targets:
        if isinstance(m, NEURON_LAYERS):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, NORM_LAYERS):
            if hasattr(m, "reset_running_stats") and getattr(m, "track_running_stats", False):
                m.reset_running_stats()
            if getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def prune_channels(
    model: nn.Module, graph: ChannelGraph, kept_groups: torch.Tensor, init: str = "glorot"
) -> dict[str, tuple[int, int]]:
    """Remove the channels of dropped groups from ``model`` in place.

    Args:
        model: the model ``graph`` was traced from.
        graph: its channel graph.
        kept_groups: ``(G,)`` bool, which groups survive.
        init: ``"glorot"`` re-initialises the traced layers, ``"keep"`` keeps the surviving weights.

    Returns:
        ``{layer: (kept, total)}`` output channels of every neuron layer.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    kept_groups = torch.as_tensor(kept_groups, dtype=torch.bool).cpu()
    if kept_groups.shape != (graph.n_groups,):
        raise ValueError(f"kept_groups must have shape ({graph.n_groups},), got {tuple(kept_groups.shape)}")
    modules = dict(model.named_modules())
    counts = {}
    for name, layer in graph.layers.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"the model has no layer {name!r}; was the graph traced from another model?")
        keep_out = kept_groups[layer.out_groups].nonzero().flatten()
        keep_in = kept_groups[layer.in_groups].nonzero().flatten()
        if keep_out.numel() == 0:
            raise ValueError(f"pruning would remove every neuron of layer {name!r}")
        counts[name] = (int(keep_out.numel()), len(layer.out_groups))
        _slice_layer(module, keep_in.to(_device(module)), keep_out.to(_device(module)))
    for name, groups in graph.norms.items():
        module = modules[name]
        keep = kept_groups[groups].nonzero().flatten()
        _slice_norm(module, keep.to(_device(module)))
    if init == "glorot":
        reinitialize(model, list(graph.layers) + list(graph.norms))
    return counts


def channel_spec(model: nn.Module) -> dict[str, int]:
    """Channel counts of every conv / linear / norm layer as ``{"<module>.<attr>": int}``."""
    spec = {}
    for name, module in model.named_modules():
        for attr in _spec_attrs(module):
            spec[f"{name}.{attr}"] = int(getattr(module, attr))
    return spec


def _resize(module: nn.Module, values: Mapping[str, int], name: str) -> None:
    current = {a: int(getattr(module, a)) for a in _spec_attrs(module)}
    target = {**current, **values}
    if target == current:
        return
    if any(v < 1 for v in target.values()):
        raise ValueError(f"channel spec of {name!r} has a non-positive count: {values}")
    weight = getattr(module, "weight", None)
    kwargs = {"device": weight.device, "dtype": weight.dtype} if weight is not None else {}
    if isinstance(module, CONV_LAYERS + CONV_T_LAYERS):
        c_in, c_out, groups = target["in_channels"], target["out_channels"], target["groups"]
        if c_in % groups or c_out % groups:
            raise ValueError(
                f"channel spec of {name!r}: channels {c_in}/{c_out} not divisible by groups {groups}"
            )
        module.in_channels, module.out_channels, module.groups = c_in, c_out, groups
        shape = (c_in, c_out // groups) if isinstance(module, CONV_T_LAYERS) else (c_out, c_in // groups)
        module.weight = nn.Parameter(torch.empty(*shape, *module.kernel_size, **kwargs))
        if module.bias is not None:
            module.bias = nn.Parameter(torch.empty(c_out, **kwargs))
        module.reset_parameters()
    elif isinstance(module, nn.Linear):
        module.in_features, module.out_features = target["in_features"], target["out_features"]
        module.weight = nn.Parameter(torch.empty(module.out_features, module.in_features, **kwargs))
        if module.bias is not None:
            module.bias = nn.Parameter(torch.empty(module.out_features, **kwargs))
        module.reset_parameters()
    else:
        if isinstance(module, nn.GroupNorm):
            n, groups = target["num_channels"], target["num_groups"]
            if n % groups:
                raise ValueError(f"channel spec of {name!r}: {n} channels not divisible by {groups} groups")
            module.num_channels, module.num_groups = n, groups
        else:
            n = target["num_features"]
            module.num_features = n
        if getattr(module, "weight", None) is not None:
            module.weight = nn.Parameter(torch.empty(n, **kwargs))
            module.bias = nn.Parameter(torch.empty(n, **kwargs)) if module.bias is not None else None
        for buffer in ("running_mean", "running_var"):
            old = getattr(module, buffer, None)
            if old is not None:
                setattr(module, buffer, torch.empty(n, device=old.device, dtype=old.dtype))
        module.reset_parameters()


def apply_channel_spec(model: nn.Module, spec: Mapping[str, int]) -> None:
    """Give ``model`` the channel counts of ``spec`` (from :func:`channel_spec`), in place.

    Resized layers get fresh parameters of the new shape (their values are meant to be overwritten by
    ``load_state_dict``); layers whose counts already match are untouched. Works on a full model as
    well as on one pruned to another spec.
    """
    if not isinstance(spec, Mapping):
        raise ValueError(f"spec must be a mapping of '<module>.<attr>' to int, got {type(spec).__name__}")
    modules = dict(model.named_modules())
    per_module: dict[str, dict[str, int]] = {}
    for key, value in spec.items():
        if not isinstance(key, str) or "." not in key:
            raise ValueError(f"channel spec key {key!r} is not of the form '<module>.<attr>'")
        name, attr = key.rsplit(".", 1)
        if name not in modules:
            raise ValueError(f"channel spec names a module {name!r} that the model does not have")
        if attr not in _spec_attrs(modules[name]):
            raise ValueError(
                f"channel spec attribute {attr!r} does not apply to {name!r} ({type(modules[name]).__name__})"
            )
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"channel spec value of {key!r} must be an int, got {value!r}")
        per_module.setdefault(name, {})[attr] = value
    for name, values in per_module.items():
        _resize(modules[name], values, name)
