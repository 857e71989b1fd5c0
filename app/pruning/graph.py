"""Channel dependency graph of any ``nn.Module``, traced from one eager forward pass.

Neurons are the output channels of convolutions (1d/2d/3d, transposed) and linear layers (Sec. 5.4).
Removing a neuron is only possible together with every channel it is *coupled* to: layers joined by an
addition keep the same channels (Sec. 5.6.1.2), a depthwise convolution keeps the channels of its input,
a normalisation layer follows the channels it normalises, a concatenation stacks the channels of its
inputs, and a flatten turns each channel into a block of features of the next linear layer.

The tracer runs the model once, eagerly, so any Python control flow works. Leaf layers whose weights
surgery knows how to slice are hooked as units; every other tensor operation is seen through a
``TorchFunctionMode`` and classified: elementwise (with broadcasting), concatenation, split, reshape,
spatial (pooling, interpolation, padding), reduction. Each tensor carries a *channel map*: one node per
index of its dimension 1. Nodes are merged with a union-find; a class of merged nodes is a *group*,
the unit surgery keeps or removes. Anything the tracer cannot prove safe (an unknown operation, a
parameter or constant broadcast along the channels, a permutation of the channel dimension, the model
output) *fixes* the groups it touches: they are never pruned. Grouped (non-depthwise) convolutions keep
all their channels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["ChannelGraph", "LayerChannels", "NEURON_LAYERS", "NORM_LAYERS", "trace_channel_graph"]

CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_T_LAYERS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
NEURON_LAYERS = CONV_LAYERS + CONV_T_LAYERS + (nn.Linear,)
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)

_CAT = {"cat", "concat", "concatenate"}
_SPLIT = {"split", "chunk", "tensor_split", "split_with_sizes", "unsafe_split"}
_PERMUTE = {"transpose", "transpose_", "swapaxes", "swapdims", "permute", "movedim", "moveaxis"}
_RESHAPE = {
    "view", "reshape", "flatten", "unflatten", "squeeze", "squeeze_", "unsqueeze", "unsqueeze_", "view_as",
    "reshape_as", "expand", "expand_as", "broadcast_to", "repeat", "tile",
}  # fmt: skip
_SPATIAL_NAMES = {"interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "pad", "grid_sample"}
_REDUCTIONS = {
    "sum", "mean", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod", "argmax",
    "argmin", "nansum", "nanmean", "median", "count_nonzero", "all", "any",
}  # fmt: skip
_MAX_FLAT_FEATURES = 1 << 20  # flattening more features than this keeps the channels whole
_NEUTRAL = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "detach", "size", "dim", "numel"}
_MIXING = {
    "matmul", "mm", "bmm", "einsum", "linear", "bilinear", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "baddbmm", "addmm", "addbmm", "tensordot", "outer", "kron",
    "embedding", "embedding_bag", "batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm",
    "local_response_norm", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle",
    "scaled_dot_product_attention", "multi_head_attention_forward", "prelu", "repeat_interleave", "stack",
    "hstack", "vstack", "dstack", "unbind", "diagonal", "index_select", "gather", "scatter", "take",
    "__setitem__", "index_put", "index_put_", "masked_scatter", "unfold", "fold", "roll", "flip",
}  # fmt: skip


@dataclass
class LayerChannels:
    """A layer whose output channels are neurons, with the group of each input and output channel."""

    name: str
    kind: str  # "conv", "conv_transpose" or "linear"
    out_groups: list[int]
    in_groups: list[int]
    groups: int = 1


@dataclass
class ChannelGraph:
    """Groups of coupled channels of a model (see the module docstring).

    ``layers`` are the neuron layers in call order; ``norms`` map each normalisation layer to the group
    of each of its channels; ``fixed[g]`` says group ``g`` must be kept; ``members[g]`` lists the
    ``(layer, channel)`` neurons of group ``g``.
    """

    layers: dict[str, LayerChannels]
    norms: dict[str, list[int]]
    fixed: list[bool]
    members: list[list[tuple[str, int]]] = field(default_factory=list)

    @property
    def n_groups(self) -> int:
        return len(self.fixed)

    @property
    def n_neurons(self) -> int:
        return sum(len(layer.out_groups) for layer in self.layers.values())

    def group_sizes(self) -> torch.Tensor:
        """Number of neurons in each group, ``(G,)`` long."""
        return torch.tensor([len(m) for m in self.members], dtype=torch.long)

    def fixed_mask(self) -> torch.Tensor:
        return torch.tensor(self.fixed, dtype=torch.bool)

    def prunable_layers(self) -> list[str]:
        """Layers with at least one neuron that may be removed."""
        return [
            name for name, layer in self.layers.items() if not all(self.fixed[g] for g in layer.out_groups)
        ]

    def with_fixed_layers(self, names: Sequence[str]) -> ChannelGraph:
        """A copy where every neuron of the named layers (or of layers inside named containers) is kept."""
        fixed = list(self.fixed)
        for layer in self.layers.values():
            if any(layer.name == n or layer.name.startswith(n + ".") or n == "" for n in names):
                for g in layer.out_groups:
                    fixed[g] = True
        return ChannelGraph(layers=self.layers, norms=self.norms, fixed=fixed, members=self.members)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.fixed: list[bool] = []

    def new(self, n: int, fixed: bool = False) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.fixed.extend([fixed] * n)
        return list(range(start, start + n))

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            self.fixed[ra] = self.fixed[ra] or self.fixed[rb]

    def fix(self, a: int) -> None:
        self.fixed[self.find(a)] = True


def _flat_tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _flat_tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _flat_tensors(item)]
    return []


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


class _Tracer(TorchFunctionMode):
    """Propagates channel maps through the forward pass of ``model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.uf = _UnionFind()
        self.maps: dict[int, list[int]] = {}
        self.alive: list[torch.Tensor] = []  # keeps ids unique while tracing
        self.names = {id(m): n for n, m in model.named_modules()}
        self.layers: dict[str, dict[str, Any]] = {}
        self.norms: dict[str, list[int]] = {}
        self.opaque_depth = 0
        self.model_depth = 0
        self.called_root = False

    # -- channel maps -------------------------------------------------------------------------------
    def map_of(self, t: torch.Tensor) -> list[int] | None:
        """Nodes of dimension 1 of ``t``; untracked tensors get fresh fixed nodes."""
        if t.dim() < 2:
            return None
        m = self.maps.get(id(t))
        if m is None or len(m) != t.shape[1]:
            m = self.uf.new(int(t.shape[1]), fixed=True)
            self.set_map(t, m)
        return m

    def set_map(self, t: torch.Tensor, m: list[int]) -> None:
        if t.dim() < 2 or len(m) != t.shape[1]:
            raise RuntimeError("channel map does not match the tensor")
        self.maps[id(t)] = m
        self.alive.append(t)

    def fix_all(self, tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            m = self.map_of(t)
            if m is not None:
                for node in m:
                    self.uf.fix(node)

    def merge_into(self, target: list[int], other: list[int]) -> None:
        for a, b in zip(target, other):
            self.uf.union(a, b)

    # -- module hooks -------------------------------------------------------------------------------
    def pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module is self.model:
            self.model_depth += 1
            self.called_root = True
        if isinstance(module, NEURON_LAYERS + NORM_LAYERS):
            self.opaque_depth += 1

    def post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(module, NEURON_LAYERS + NORM_LAYERS):
            self.opaque_depth -= 1
            if self.opaque_depth == 0 and self.model_depth > 0:
                self.record_module(module, args, output)
        if module is self.model:
            self.model_depth -= 1
            if self.model_depth == 0:
                self.fix_all(_flat_tensors(output))

    def record_module(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        name = self.names[id(module)]
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if not isinstance(output, torch.Tensor) or x is None:
            self.fix_all(_flat_tensors(args) + _flat_tensors(output))
            return
        if isinstance(module, NORM_LAYERS):
            in_map = self.map_of(x)
            if in_map is None:
                return
            if name in self.norms:
                self.merge_into(self.norms[name], in_map)
            else:
                self.norms[name] = in_map
            self.set_map(output, self.norms[name])
            return
        if isinstance(module, nn.Linear) and x.dim() != 2:
            # features are on the last dimension, which is not tracked: keep this layer whole
            if output.dim() >= 2 and output.shape[:2] == x.shape[:2]:
                self.set_map(output, self.map_of(x))
            return
        in_map = self.map_of(x)
        if in_map is None:
            return
        transposed = isinstance(module, CONV_T_LAYERS)
        kind = "linear" if isinstance(module, nn.Linear) else ("conv_transpose" if transposed else "conv")
        groups = getattr(module, "groups", 1)
        n_in, n_out = len(in_map), int(output.shape[1])
        entry = self.layers.get(name)
        if entry is None:
            out_nodes = self.uf.new(n_out)
            entry = {"kind": kind, "in": list(in_map), "out": out_nodes, "groups": groups}
            self.layers[name] = entry
        else:
            self.merge_into(entry["in"], in_map)
        if groups > 1:
            if groups == n_in and n_out % n_in == 0:  # depthwise: output j belongs to input j // k
                k = n_out // n_in
                for j, node in enumerate(entry["out"]):
                    self.uf.union(in_map[j // k], node)
            else:  # grouped convolution: its channels are kept whole
                for node in in_map + entry["out"]:
                    self.uf.fix(node)
        self.set_map(output, entry["out"])

    # -- functions ----------------------------------------------------------------------------------
    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.opaque_depth == 0 and self.model_depth > 0:
            inputs = _flat_tensors(args) + _flat_tensors(kwargs)
            outputs = _flat_tensors(out)
            if inputs and (outputs or getattr(func, "__name__", "") in _MIXING):
                try:
                    self.record_function(getattr(func, "__name__", ""), args, kwargs, inputs, out, outputs)
                except Exception:  # an operation the rules cannot read: keep its channels whole
                    self.fix_all(inputs)
        return out

    def record_function(
        self,
        name: str,
        args: tuple,
        kwargs: dict,
        inputs: list[torch.Tensor],
        out: Any,
        outputs: list[torch.Tensor],
    ) -> None:
        base = name.strip("_")
        main = inputs[0]
        if base in _NEUTRAL:
            if base == "detach":
                self.preserve(main, outputs[0])
            return
        if name in _MIXING or base in _MIXING or not outputs:
            self.fix_all(inputs)
            return
        if base in _CAT:
            self.record_cat(args, kwargs, outputs[0])
            return
        if base in _SPLIT:
            self.record_split(base, args, kwargs, main, outputs)
            return
        if base in _PERMUTE:
            self.record_permute(base, args, kwargs, main, outputs[0])
            return
        if base in _RESHAPE:
            self.record_reshape(base, main, outputs[0])
            return
        if name == "__getitem__":
            self.record_getitem(args[1], main, outputs[0])
            return
        if "pool" in base or base in _SPATIAL_NAMES:
            self.record_spatial(main, outputs)
            return
        if base in _REDUCTIONS and not (len(args) > 1 and isinstance(args[1], torch.Tensor)):
            self.record_reduction(args, kwargs, main, outputs)
            return
        self.record_elementwise(inputs, outputs)

    def preserve(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        m = self.map_of(src)
        if m is not None and dst.dim() >= 2:
            if dst is src:
                return
            self.set_map(dst, m)

    def record_cat(self, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        tensors = list(args[0]) if args else list(kwargs.get("tensors", []))
        dim = kwargs.get("dim", kwargs.get("axis", args[1] if len(args) > 1 else 0))
        dim = _norm_dim(dim, out.dim())
        parts = [t for t in tensors if isinstance(t, torch.Tensor) and t.dim() == out.dim()]
        maps = [self.map_of(t) for t in parts]
        if out.dim() < 2 or any(m is None for m in maps):
            self.fix_all(parts)
            return
        if dim == 1:
            self.set_map(out, [node for m in maps for node in m])
        else:
            for m in maps[1:]:
                self.merge_into(maps[0], m)
            self.set_map(out, maps[0])

    def record_split(
        self, base: str, args: tuple, kwargs: dict, main: torch.Tensor, outputs: list[torch.Tensor]
    ) -> None:
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
        dim = _norm_dim(dim, main.dim())
        m = self.map_of(main)
        if m is None:
            return
        if dim == 1:
            start = 0
            for t in outputs:
                self.set_map(t, m[start : start + t.shape[1]])
                start += t.shape[1]
        elif dim > 1:
            for t in outputs:
                self.preserve(main, t)
        else:
            self.fix_all([main])

    def record_permute(
        self, base: str, args: tuple, kwargs: dict, main: torch.Tensor, out: torch.Tensor
    ) -> None:
        ndim = main.dim()
        if base == "permute":
            dims = args[1:] if len(args) > 1 else kwargs.get("dims", ())
            if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                dims = dims[0]
            dims = [_norm_dim(d, ndim) for d in dims]
            keeps = len(dims) >= 2 and dims[0] == 0 and dims[1] == 1
        elif base in ("movedim", "moveaxis"):
            src = args[1] if len(args) > 1 else kwargs.get("source")
            dst = args[2] if len(args) > 2 else kwargs.get("destination")
            moved = [src] if isinstance(src, int) else list(src)
            moved += [dst] if isinstance(dst, int) else list(dst)
            keeps = all(_norm_dim(d, ndim) > 1 for d in moved)
        else:
            d0 = args[1] if len(args) > 1 else kwargs.get("dim0")
            d1 = args[2] if len(args) > 2 else kwargs.get("dim1")
            keeps = _norm_dim(d0, ndim) > 1 and _norm_dim(d1, ndim) > 1
        if keeps:
            self.preserve(main, out)
        else:
            self.fix_all([main])

    def record_reshape(self, base: str, main: torch.Tensor, out: torch.Tensor) -> None:
        m = self.map_of(main)
        if m is None or out.dim() < 2 or out.shape[0] != main.shape[0]:
            self.fix_all([main])
            return
        c_in, c_out = int(main.shape[1]), int(out.shape[1])
        rest_in = math.prod(main.shape[2:])
        rest_out = math.prod(out.shape[2:])
        copies = base in ("expand", "expand_as", "broadcast_to", "repeat", "tile")
        if c_out == c_in and (rest_in == rest_out or copies):
            self.preserve(main, out)
        elif base in ("repeat", "tile") and c_out % c_in == 0:
            self.set_map(out, m * (c_out // c_in))
        elif not copies and c_out == c_in * rest_in and c_out <= _MAX_FLAT_FEATURES:
            self.set_map(out, [node for node in m for _ in range(rest_in)])  # flatten: a block per channel
        elif not copies and c_in == c_out * rest_out:
            block = c_in // c_out  # unflatten: each new channel owns a block of the old ones
            merged = [m[c * block] for c in range(c_out)]
            for c in range(c_out):
                for node in m[c * block : (c + 1) * block]:
                    self.uf.union(merged[c], node)
            self.set_map(out, merged)
        else:
            self.fix_all([main])

    def record_getitem(self, index: Any, main: torch.Tensor, out: torch.Tensor) -> None:
        idx = index if isinstance(index, tuple) else (index,)
        full = slice(None)
        untouched = False
        if out.dim() == main.dim() and out.shape[:2] == main.shape[:2]:
            if idx and idx[0] is Ellipsis:
                explicit = [i for i in idx[1:] if i is not None]
                untouched = len(explicit) <= main.dim() - 2
            elif len(idx) >= 2 and idx[0] == full and idx[1] == full:
                untouched = True
            elif len(idx) >= 2 and idx[0] == full and idx[1] is Ellipsis:
                untouched = True
            elif len(idx) == 1 and idx[0] == full:
                untouched = True
        if not untouched and out.dim() == main.dim() and out.shape[1:] == main.shape[1:]:
            first = idx[0] if idx else None
            untouched = len(idx) == 1 and isinstance(first, (torch.Tensor, list, slice))  # batch selection
        if untouched:
            self.preserve(main, out)
        else:
            self.fix_all([main])

    def record_spatial(self, main: torch.Tensor, outputs: list[torch.Tensor]) -> None:
        for t in outputs:
            if t.dim() == main.dim() and t.shape[:2] == main.shape[:2]:
                self.preserve(main, t)
            else:
                self.fix_all([main])

    def record_reduction(
        self, args: tuple, kwargs: dict, main: torch.Tensor, outputs: list[torch.Tensor]
    ) -> None:
        dim = kwargs.get("dim", kwargs.get("axis", args[1] if len(args) > 1 else None))
        keepdim = bool(
            kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
        )
        if dim is None:
            return  # a full reduction: any channel count is fine
        dims = [dim] if isinstance(dim, int) else list(dim)
        dims = [_norm_dim(d, main.dim()) for d in dims]
        if 0 in dims and not keepdim:
            self.fix_all([main])
            return
        if 1 in dims:
            return  # channels are reduced away: any channel count is fine
        for t in outputs:
            if t.dim() >= 2 and t.shape[:2] == main.shape[:2]:
                self.preserve(main, t)

    def record_elementwise(self, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        shape = torch.broadcast_shapes(*[t.shape for t in inputs])
        if any(t.shape != shape for t in outputs):
            self.fix_all(inputs)
            return
        if len(shape) < 2:
            return
        channels = int(shape[1])
        merged: list[int] | None = None
        for t in inputs:
            offset = len(shape) - t.dim()
            aligned = 1 - offset
            if aligned < 0 or t.shape[aligned] == 1 and channels != 1:
                continue
            if aligned == 1:
                m = self.map_of(t)
            else:  # a lower-dimensional tensor broadcast along the channels: it cannot be sliced
                m = self.uf.new(channels, fixed=True)
            if merged is None:
                merged = m
            else:
                self.merge_into(merged, m)
        if merged is None:
            merged = self.uf.new(channels, fixed=True)
        for t in outputs:
            self.set_map(t, merged)


def trace_channel_graph(model: nn.Module, run: Callable[[nn.Module], Any]) -> ChannelGraph:
    """Trace the channel groups of ``model`` from one forward pass.

    Args:
        model: any module; its root ``forward`` must be called by ``run``.
        run: runs the model once, e.g. ``lambda m: loss_fn(m, batch)``. It runs under ``torch.no_grad()``.

    Returns:
        The :class:`ChannelGraph`. The channels of every model output are fixed (all output classes of
        the last layer are kept).
    """
    tracer = _Tracer(model)
    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(tracer.pre_hook))
        handles.append(module.register_forward_hook(tracer.post_hook))
    try:
        with torch.no_grad(), tracer:
            run(model)
    finally:
        for handle in handles:
            handle.remove()
    if not tracer.called_root:
        raise ValueError("the loss function never called the model's forward, so no graph could be traced")

    uf = tracer.uf
    roots: dict[int, int] = {}

    def group(node: int) -> int:
        root = uf.find(node)
        if root not in roots:
            roots[root] = len(roots)
        return roots[root]

    layers = {
        name: LayerChannels(
            name=name,
            kind=entry["kind"],
            out_groups=[group(n) for n in entry["out"]],
            in_groups=[group(n) for n in entry["in"]],
            groups=entry["groups"],
        )
        for name, entry in tracer.layers.items()
    }
    norms = {name: [group(n) for n in nodes] for name, nodes in tracer.norms.items()}
    fixed = [False] * len(roots)
    for root, g in roots.items():
        fixed[g] = uf.fixed[root]
    members: list[list[tuple[str, int]]] = [[] for _ in roots]
    for layer in layers.values():
        for i, g in enumerate(layer.out_groups):
            members[g].append((layer.name, i))
    tracer.maps.clear()
    tracer.alive.clear()
    return ChannelGraph(layers=layers, norms=norms, fixed=fixed, members=members)
