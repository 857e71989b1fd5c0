"""RANP core: resources, importance, reweighting / selection, surgery, channel spec, API and callback."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from app.pruning import (
    RANP,
    analyze_model,
    apply_channel_spec,
    balance_layers,
    channel_spec,
    fast_conv_weight_grad,
    measure_resources,
    neuron_importance,
    parameter_mask_gradients,
    prune_at_init,
    resource_reweight,
    search_max_sparsity,
    select_global,
    trace_channel_graph,
)
from app.pruning.callback import CHECKPOINT_KEY, restore_channel_spec
from app.pruning.importance import per_neuron

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
IN = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


class SkipNet(nn.Module):
    """conv-BN-ReLU(inplace) | pool | conv-norm | depthwise -> 1x1 conv + residual add | transposed conv
    | concat with the first features | conv-IN | 1x1 head. Works in 2D and 3D."""

    def __init__(self, dim: int = 2, width: int = 8, classes: int = 3, group_norm: bool = True) -> None:
        super().__init__()
        c = width
        self.c1 = CONV[dim](1, c, 3, padding=1)
        self.b1 = BN[dim](c)
        self.c2 = CONV[dim](c, 2 * c, 3, padding=1)
        self.n2 = nn.GroupNorm(4, 2 * c) if group_norm else BN[dim](2 * c)
        self.c3 = CONV[dim](2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.c4 = CONV[dim](2 * c, 2 * c, 1)
        self.up = CONV_T[dim](2 * c, c, 2, stride=2)
        self.c5 = CONV[dim](2 * c, c, 3, padding=1)
        self.n5 = IN[dim](c, affine=True)
        self.out = CONV[dim](c, classes, 1)
        self.relu = nn.ReLU(inplace=True)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.b1(self.c1(x)))
        p = F.max_pool2d(a, 2) if self.dim == 2 else F.max_pool3d(a, 2)
        b = F.relu(self.n2(self.c2(p)))
        r = self.c4(F.relu(self.c3(b))) + b
        u = torch.cat([self.up(r), a], dim=1)
        return self.out(F.relu(self.n5(self.c5(u))))


def make_batches(dim: int, n: int = 2, size: int = 8, classes: int = 3, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    shape = (2, 1) + (size,) * dim
    return [
        {
            "image": torch.randn(shape, generator=g),
            "mask": torch.randint(0, classes, shape[:1] + shape[2:], generator=g),
        }
        for _ in range(n)
    ]


def ce_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["image"]), batch["mask"])


# ---------------------------------------------------------------------------------------------------
# resources (Eq. 5.12)


def test_resources_hand_computed_and_transposed_conv_not_over_counted():
    model = nn.Sequential(
        nn.Conv3d(1, 2, 3, padding=1),
        nn.BatchNorm3d(2),
        nn.ReLU(),
        nn.ConvTranspose3d(2, 3, 2, stride=2, bias=False),
    )
    table = measure_resources(model, torch.randn(1, 1, 4, 4, 4))
    conv, bn, relu, up = table.layers
    # Eq. 5.12a: (2 * 27 * 1 - 1 + 1) * 2 channels * 64 voxels
    assert conv.flops == 54 * 2 * 64 and conv.params == 2 * 27 + 2
    assert bn.flops == 4 * 128 and bn.params == 4
    assert relu.flops == 0 and not relu.counts_memory
    # each output voxel of a stride-2, 2^3 transposed conv sums exactly 2 products (one per input
    # channel): (2 * 2 - 1) * 3 * 512; the convolution formula would give (2 * 8 * 2 - 1) * 3 * 512
    assert up.flops == 3 * 3 * 512
    assert up.output_shape == (1, 3, 8, 8, 8)
    assert table.params == 56 + 4 + 2 * 3 * 8
    assert table.flops == conv.flops + bn.flops + up.flops
    assert table.memory_bytes == (128 + 128 + 1536) * 4
    assert table.totals()["memory_mb"] == pytest.approx((128 + 128 + 1536) * 4 / 2**20)


def test_resources_linear_and_shared_module_called_twice():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 4))

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return self.lin(self.lin(x))

    table = measure_resources(Twice(), torch.randn(5, 4))
    (row,) = table.layers
    assert row.flops == 2 * (2 * 4 - 1) * 4 * 5  # no bias: (2 * in - 1) per output, twice
    assert row.output_elements == 2 * 20
    assert table.params == 16
    assert measure_resources(model, lambda m: m(torch.randn(2, 4))).layer("0").flops == (2 * 4) * 3 * 2
    with pytest.raises(ValueError, match="no layer named"):
        table.layer("missing")


# ---------------------------------------------------------------------------------------------------
# importance (Sec. 5.4.1, Alg. 5)


def test_importance_shapes_non_negative_and_equal_to_manual_gradients():
    torch.manual_seed(1)
    model = SkipNet(2)
    batches = make_batches(2, n=2)
    pmg = parameter_mask_gradients(model, batches, ce_loss)
    assert pmg.n_batches == 2
    manual_abs, manual_signed = {}, {}
    for batch in batches:
        model.zero_grad()
        ce_loss(model, batch).backward()
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                g = per_neuron(m, m.weight.detach() * m.weight.grad)
                manual_abs[name] = manual_abs.get(name, 0) + g.abs() / 2
                manual_signed[name] = manual_signed.get(name, 0) + g / 2
    for reduction in ("sum", "mean", "max"):
        for kind in ("mpmg", "mnmg"):
            scores = neuron_importance(pmg, kind, reduction)
            for name, s in scores.items():
                m = dict(model.named_modules())[name]
                assert s.shape == (m.out_channels,)
                assert (s >= 0).all()
    mpmg = neuron_importance(pmg, "mpmg", "sum")
    mnmg = neuron_importance(pmg, "mnmg", "sum")
    mpmg_max = neuron_importance(pmg, "mpmg", "max")
    for name in manual_abs:
        torch.testing.assert_close(mpmg[name], manual_abs[name].sum(1), rtol=1e-4, atol=1e-9)
        # the signed sum cancels: float32 rounding (the weight gradient is summed in another order by
        # fast_conv_weight_grad) is judged against the magnitude of the terms
        scale = float(mpmg[name].max())
        torch.testing.assert_close(mnmg[name], manual_signed[name].sum(1).abs(), rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(mpmg_max[name], manual_abs[name].amax(1), rtol=1e-4, atol=1e-9)
        assert (mnmg[name] <= mpmg[name] + 1e-9).all()  # |sum g| <= sum |g|


def test_mnmg_sum_equals_neuron_mask_gradient_proposition_1():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(4, 3, 1)).double()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 6, 6))
    mask = torch.ones(4, dtype=torch.float64, requires_grad=True)
    handle = model[0].register_forward_hook(lambda m, i, o: o * mask.view(1, -1, 1, 1))
    F.cross_entropy(model(x), y).backward()
    handle.remove()
    pmg = parameter_mask_gradients(model, [(x, y)], lambda m, b: F.cross_entropy(m(b[0]), b[1]), layers=["0"])
    torch.testing.assert_close(neuron_importance(pmg, "mnmg", "sum")["0"], mask.grad.abs())


def test_per_neuron_grouped_transposed_conv():
    m = nn.ConvTranspose2d(4, 6, 2, groups=2)  # weight (4, 3, 2, 2)
    w = torch.arange(m.weight.numel(), dtype=torch.float32).reshape(m.weight.shape)
    rows = per_neuron(m, w)
    assert rows.shape == (6, 2 * 4)
    for j in range(6):
        group, jj = divmod(j, 3)
        torch.testing.assert_close(rows[j], w[2 * group : 2 * group + 2, jj].flatten())


# ---------------------------------------------------------------------------------------------------
# channel graph


def test_graph_couples_residual_depthwise_and_concat_and_fixes_outputs():
    model = SkipNet(3)
    graph = trace_channel_graph(model, lambda m: ce_loss(m, make_batches(3, n=1)[0]))
    layers = graph.layers
    assert list(layers) == ["c1", "c2", "c3", "c4", "up", "c5", "out"]
    assert layers["c2"].out_groups == layers["c3"].out_groups == layers["c4"].out_groups  # add + depthwise
    assert layers["c5"].in_groups == layers["up"].out_groups + layers["c1"].out_groups  # concat order
    assert layers["up"].in_groups == layers["c4"].out_groups
    assert graph.norms["b1"] == layers["c1"].out_groups and graph.norms["n5"] == layers["c5"].out_groups
    assert all(graph.fixed[g] for g in layers["out"].out_groups)  # output classes
    assert all(graph.fixed[g] for g in layers["c1"].in_groups)  # image channels
    assert not any(graph.fixed[g] for g in layers["c2"].out_groups)
    assert graph.n_neurons == 8 + 3 * 16 + 8 + 8 + 3
    assert sorted(graph.prunable_layers()) == sorted(["c1", "c2", "c3", "c4", "up", "c5"])


def test_graph_flatten_linear_param_broadcast_and_permute():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 5, 3, padding=1)
            self.c = nn.Conv2d(5, 6, 1)
            self.scale = nn.Parameter(torch.ones(1, 5, 1, 1))
            self.fc = nn.Linear(4 * 4, 2)
            self.fc2 = nn.Linear(6, 2)

        def forward(self, x):
            a = F.adaptive_avg_pool2d(torch.relu(self.a(x)), 2)
            h = self.fc(torch.flatten(a, 1))
            b = self.b(torch.relu(self.a(x))) * self.scale  # a parameter along the channels
            c = self.c(b).permute(0, 2, 3, 1).mean((1, 2))  # channels moved away from dim 1
            return h + self.fc2(c)

    graph = trace_channel_graph(Net(), lambda m: m(torch.randn(2, 3, 6, 6)).sum())
    a, fc = graph.layers["a"], graph.layers["fc"]
    assert fc.in_groups == [g for g in a.out_groups for _ in range(4)]
    assert all(graph.fixed[g] for g in graph.layers["b"].out_groups)
    assert all(graph.fixed[g] for g in graph.layers["c"].out_groups)
    assert not any(graph.fixed[g] for g in a.out_groups)
    assert all(graph.fixed[g] for g in fc.out_groups)  # model output


# ---------------------------------------------------------------------------------------------------
# reweighting and selection (Eq. 5.9-5.11, Alg. 6)


def test_balance_layers_equalises_means_and_keeps_zero_layers():
    scores = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([0.5, 0.5, 2.0]), "z": torch.zeros(2)}
    out = balance_layers(scores)
    assert float(out["a"].mean()) == pytest.approx(2.0) and float(out["b"].mean()) == pytest.approx(2.0)
    torch.testing.assert_close(out["b"], scores["b"] * 2.0)
    assert (out["z"] == 0).all()


def test_resource_reweight_matches_eq_5_10():
    scores = {"cheap": torch.ones(2), "dear": torch.ones(2)}
    out = resource_reweight(scores, {"cheap": 1.0, "dear": 4.0}, lam=11.0)
    soft = torch.softmax(-torch.tensor([0.25, 1.0], dtype=torch.float64), 0)
    assert float(out["cheap"][0]) == pytest.approx(1 + 11 * float(soft[0]))
    assert float(out["dear"][0]) == pytest.approx(1 + 11 * float(soft[1]))
    assert float(out["cheap"][0]) > float(out["dear"][0])
    with pytest.raises(ValueError, match="lam"):
        resource_reweight(scores, {"cheap": 1.0, "dear": 4.0}, lam=0.0)


@pytest.fixture(scope="module")
def analysis_2d():
    torch.manual_seed(3)
    model = SkipNet(2)
    return model, analyze_model(model, make_batches(2, n=2), ce_loss)


def test_threshold_keeps_a_neuron_per_layer_and_all_classes(analysis_2d):
    _, an = analysis_2d
    scores = neuron_importance(an.gradients)
    plain = select_global(an.graph, scores, 0.97)
    assert not plain.feasible and plain.empty_layers
    kept = select_global(an.graph, scores, 0.97, keep_top=True)
    assert kept.feasible and set(kept.repaired_layers) == set(plain.empty_layers)
    assert all(k >= 1 for k in kept.kept.values())
    assert kept.kept["out"] == 3
    half = select_global(an.graph, scores, 0.3)
    assert sum(half.total.values()) - sum(half.kept.values()) >= math.ceil(0.3 * an.graph.n_neurons)
    for method in ("vanilla", "weighted", "ranp_f", "ranp_m", "random", "layerwise"):
        sel = an.select(method, 0.2)
        assert sel.kept["out"] == 3 and sel.feasible


def test_alg6_search_finds_the_feasibility_boundary(analysis_2d):
    _, an = analysis_2d
    for method in ("vanilla", "ranp_f", "snip"):
        kappa = an.max_sparsity(method)
        assert an.select(method, kappa).feasible
        assert not an.select(method, min(kappa + 2e-4, 0.9999)).feasible
    assert (
        search_max_sparsity(lambda k: an.select("vanilla", k), tol=1e-2) <= an.max_sparsity("vanilla") + 1e-2
    )


def test_layerwise_random_and_snip_baselines(analysis_2d):
    _, an = analysis_2d
    sel = an.select("layerwise", 0.5)
    for name in ("c1", "up", "c5"):  # uncoupled layers keep exactly ceil(half)
        assert sel.kept[name] == math.ceil(0.5 * sel.total[name])
    a, b, c = (
        an.select("random", 0.5, seed=1),
        an.select("random", 0.5, seed=1),
        an.select("random", 0.5, seed=2),
    )
    assert torch.equal(a.kept_groups, b.kept_groups) and not torch.equal(a.kept_groups, c.kept_groups)
    assert an.select("snip", 0.0).sparsity == 0.0
    snip = an.select("snip", 0.9)
    flat = torch.cat([g.flatten().double() for g in an.gradients.absolute.values()])
    threshold = torch.kthvalue(flat, math.floor(0.9 * flat.numel())).values
    expected = int((an.gradients.absolute["c5"].double().amax(1) > threshold).sum())
    assert snip.kept["c5"] == max(expected, 0) and snip.kept["out"] == 3


# ---------------------------------------------------------------------------------------------------
# surgery


def _kill(model: SkipNet) -> int:
    """Zero whole neurons so they contribute nothing; return how many neurons died."""
    with torch.no_grad():
        for name, idx in (("c1", [1, 5]), ("c5", [3])):
            m = getattr(model, name)
            m.weight[idx] = 0
            m.bias[idx] = 0
        for name in ("c2", "c3", "c4"):  # a residual group dies only as a whole
            m = getattr(model, name)
            m.weight[[2, 7, 11]] = 0
            m.bias[[2, 7, 11]] = 0
        model.up.weight[:, [0, 4]] = 0
        model.up.bias[[0, 4]] = 0
    return 2 + 1 + 3 * 3 + 2


@pytest.mark.parametrize("dim", [2, 3])
def test_surgery_removes_dead_neurons_without_changing_the_output(dim):
    torch.manual_seed(4)
    model = SkipNet(dim, group_norm=False)
    dead = _kill(model)
    reference = copy.deepcopy(model).eval()
    batches = make_batches(dim, n=2)
    n = 8 + 3 * 16 + 8 + 8 + 3
    report = prune_at_init(model, batches, ce_loss, sparsity=dead / n, method="vanilla", init="keep")
    assert report.kept == {
        "c1": (6, 8),
        "c2": (13, 16),
        "c3": (13, 16),
        "c4": (13, 16),
        "up": (6, 8),
        "c5": (7, 8),
        "out": (3, 3),
    }
    assert report.sparsity == pytest.approx(dead / n)
    model.eval()
    x = batches[0]["image"]
    out = model(x)
    assert out.shape == reference(x).shape
    torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-5)
    assert model.c3.groups == 13 and model.c5.in_channels == 12 and model.b1.num_features == 6
    assert report.after.params < report.before.params
    assert report.after.flops < report.before.flops and report.after.memory_bytes < report.before.memory_bytes
    assert sum(p.numel() for p in model.parameters()) == report.after.params


def test_pruned_model_is_smaller_and_trains():
    torch.manual_seed(5)
    model = SkipNet(3)
    report = prune_at_init(model, make_batches(3), ce_loss, sparsity=0.3, method="ranp_f")
    assert report.sparsity >= 0.3
    assert report.reductions()["params"] > 30 and report.reductions()["flops"] > 30
    assert model.n2.num_channels == model.c2.out_channels and model.c2.out_channels % model.n2.num_groups == 0
    loss = ce_loss(model, make_batches(3)[0])
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert "| c2 |" in report.markdown() and report.summary()["kept"]["out"] == [3, 3]


@pytest.mark.parametrize("progress", [True, False])
def test_importance_progress_bar_shows_the_batch_count_when_asked(capsys, progress):
    torch.manual_seed(5)
    prune_at_init(SkipNet(2), make_batches(2, n=3), ce_loss, sparsity=0.3, n_batches=2, progress=progress)
    err = capsys.readouterr().err
    assert ("RANP importance" in err and "/2 " in err) == progress  # total: n_batches of the 3


def test_glorot_reinitialisation_of_the_slim_network():
    torch.manual_seed(6)
    model = SkipNet(3, width=16)
    prune_at_init(model, make_batches(3), ce_loss, sparsity=0.3, method="weighted", init="glorot")
    w = model.c5.weight
    fan_in, fan_out = w.shape[1] * 27, w.shape[0] * 27
    assert float(w.std()) == pytest.approx(math.sqrt(2.0 / (fan_in + fan_out)), rel=0.15)
    assert (model.c5.bias == 0).all() and (model.b1.weight == 1).all()


def test_grouped_depthwise_multiplier_linear_and_mixed_layers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # depthwise, multiplier 2
            self.gc = nn.Conv2d(16, 16, 3, padding=1, groups=4)  # grouped: kept whole
            self.b = nn.Conv1d(16, 6, 1)
            self.fc = nn.Linear(6 * 4, 5)

        def forward(self, x):
            h = self.gc(F.relu(self.dw(F.relu(self.a(x)))))
            h = F.adaptive_avg_pool2d(h, 2).flatten(2)  # (B, 16, 4)
            return self.fc(F.relu(self.b(h)).flatten(1))

    model = Net()
    batches = [(torch.randn(2, 3, 8, 8), torch.randint(0, 5, (2,)))]
    report = prune_at_init(
        model, batches, lambda m, b: F.cross_entropy(m(b[0]), b[1]), sparsity=0.2, on_empty_layer="keep_top"
    )
    assert report.kept["gc"] == (16, 16) and model.gc.in_channels == 16
    assert model.dw.out_channels == 2 * model.dw.in_channels == 2 * model.a.out_channels == 16
    assert model.fc.in_features == 4 * model.b.out_channels
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 5)


def test_smp_unet_prunes_and_runs():
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(7)
    model = smp.Unet(
        "resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(32, 16, 8), classes=3
    )
    batches = [{"image": torch.randn(2, 3, 32, 32), "mask": torch.randint(0, 3, (2, 32, 32))}]
    report = prune_at_init(model, batches, ce_loss, sparsity=0.5, method="ranp_f", on_empty_layer="keep_top")
    assert report.reductions()["flops"] > 40
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    # residual additions in the encoder keep equal channels
    layer1 = model.encoder.layer1
    assert layer1[0].conv2.out_channels == layer1[1].conv2.out_channels == model.encoder.conv1.out_channels


# ---------------------------------------------------------------------------------------------------
# channel spec


@pytest.mark.parametrize("dim", [2, 3])
def test_channel_spec_round_trip(dim):
    torch.manual_seed(8)
    model = SkipNet(dim)
    prune_at_init(model, make_batches(dim), ce_loss, sparsity=0.25, method="ranp_m")
    spec = channel_spec(model)
    assert spec["c2.out_channels"] == model.c2.out_channels and spec["n2.num_groups"] == model.n2.num_groups
    fresh = SkipNet(dim)
    apply_channel_spec(fresh, spec)
    assert channel_spec(fresh) == spec
    fresh.load_state_dict(model.state_dict())
    x = make_batches(dim)[0]["image"]
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))
    other = SkipNet(dim)  # pruned differently first
    prune_at_init(
        other, make_batches(dim, seed=1), ce_loss, sparsity=0.5, method="random", on_empty_layer="keep_top"
    )
    apply_channel_spec(other, spec)
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other.eval()(x), model(x))


def test_apply_channel_spec_rejects_bad_specs():
    model = SkipNet(2)
    with pytest.raises(ValueError, match="'nope'"):
        apply_channel_spec(model, {"nope.out_channels": 3})
    with pytest.raises(ValueError, match="num_features"):
        apply_channel_spec(model, {"c1.num_features": 3})
    with pytest.raises(ValueError, match="must be an int"):
        apply_channel_spec(model, {"c1.out_channels": 2.5})
    with pytest.raises(ValueError, match="divisible"):
        apply_channel_spec(model, {"c3.in_channels": 5})
    with pytest.raises(ValueError, match="form"):
        apply_channel_spec(model, {"c1": 3})


# ---------------------------------------------------------------------------------------------------
# bad input (issue)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, True])
def test_sparsity_outside_unit_interval(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        prune_at_init(SkipNet(2), make_batches(2), ce_loss, sparsity=sparsity)


def test_sparsity_that_empties_a_layer_names_it_and_offers_the_search_result():
    with pytest.raises(
        ValueError, match=r"removes every neuron of layer\(s\) \['.+'\].*largest feasible sparsity"
    ):
        prune_at_init(SkipNet(2), make_batches(2), ce_loss, sparsity=0.97, method="vanilla")


class ZeroInitResidual(nn.Module):
    """stem -> residual block whose last BatchNorm starts at weight 0 (timm's zero_init_last) -> head: the loss
    has no gradient with respect to the block's convolutions at initialization."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.inner = nn.Conv2d(8, 8, 3, padding=1)
        self.last = nn.Conv2d(8, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        nn.init.zeros_(self.norm.weight)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.stem(x))
        return self.head(F.relu(a + self.norm(self.last(F.relu(self.inner(a))))))


def test_layers_without_gradient_at_initialization_are_named():
    with pytest.warns(UserWarning, match=r"no gradient with respect to the weights of \['inner'"):
        analysis = analyze_model(ZeroInitResidual(), make_batches(2), ce_loss)
    assert analysis.zero_gradient_layers() == ["inner", "last"]
    with (
        pytest.warns(UserWarning),
        pytest.raises(ValueError, match=r"removes every neuron of layer\(s\) \['inner'\].*zero_init_last"),
    ):
        prune_at_init(ZeroInitResidual(), make_batches(2), ce_loss, sparsity=0.5)
    model = ZeroInitResidual()
    nn.init.ones_(model.norm.weight)
    assert not analyze_model(model, make_batches(2), ce_loss).zero_gradient_layers()


def test_no_prunable_layer():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x * self.w

    batches = [torch.randn(2, 3)]
    with pytest.raises(ValueError, match="no prunable layer"):
        prune_at_init(Scale(), batches, lambda m, b: m(b).sum())
    with pytest.raises(ValueError, match="no prunable layer"):  # the only conv is the output layer
        prune_at_init(nn.Conv2d(3, 2, 1), [torch.randn(1, 3, 4, 4)], lambda m, b: m(b).sum())


def test_loss_that_does_not_depend_on_the_masks():
    with pytest.raises(ValueError, match="does not depend on the masks"):
        prune_at_init(SkipNet(2), make_batches(2), lambda m, b: m(b["image"]).detach().sum())
    with pytest.raises(ValueError, match="does not depend on the masks"):
        prune_at_init(SkipNet(2), make_batches(2), lambda m, b: 0.0 * m(b["image"]).sum())
    with pytest.raises(ValueError, match="never called the model"):
        prune_at_init(SkipNet(2), make_batches(2), lambda m, b: torch.zeros((), requires_grad=True))


def test_ignored_layers():
    with pytest.raises(ValueError, match=r"\['c9'\]"):
        prune_at_init(SkipNet(2), make_batches(2), ce_loss, ignored_layers=["c1", "c9"])
    model = SkipNet(2)
    report = prune_at_init(model, make_batches(2), ce_loss, sparsity=0.3, ignored_layers=["c5"])
    assert report.kept["c5"] == (8, 8)
    assert model.c5.out_channels == 8


def test_other_bad_options():
    with pytest.raises(ValueError, match="unknown method"):
        prune_at_init(SkipNet(2), make_batches(2), ce_loss, method="ranp_x")
    with pytest.raises(ValueError, match="batches is empty"):
        prune_at_init(SkipNet(2), [], ce_loss)
    with pytest.raises(ValueError, match="init"):
        prune_at_init(SkipNet(2), make_batches(2), ce_loss, init="zeros")
    with pytest.raises(ValueError, match="scalar"):
        prune_at_init(SkipNet(2), make_batches(2), lambda m, b: m(b["image"]))


# ---------------------------------------------------------------------------------------------------
# Lightning callback


class TinyTask(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = SkipNet(2)

    def compute_loss(self, batch: dict) -> torch.Tensor:
        return ce_loss(self.backbone, batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.compute_loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_channel_spec(self.backbone, checkpoint)


class TinyData(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        samples = [{"image": torch.randn(1, 8, 8), "mask": torch.randint(0, 3, (8, 8))} for _ in range(8)]
        return DataLoader(samples, batch_size=2, shuffle=True)


def _trainer(tmp_path, callback, max_steps=2):
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        default_root_dir=tmp_path,
        log_every_n_steps=1,
    )


def test_callback_prunes_logs_and_checkpoint_reloads(tmp_path):
    torch.manual_seed(9)
    task = TinyTask()
    full = sum(p.numel() for p in task.backbone.parameters())
    callback = RANP(sparsity=0.3, n_batches=2, method="ranp_f")
    trainer = _trainer(tmp_path, callback)
    trainer.fit(task, datamodule=TinyData())
    assert sum(p.numel() for p in task.backbone.parameters()) < full
    assert callback.report is not None and callback.report.sparsity >= 0.3
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        assert "ranp/gflops_pruned" in f.readline()
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint[CHECKPOINT_KEY] == channel_spec(task.backbone)
    loaded = TinyTask.load_from_checkpoint(path)
    x = torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(loaded.backbone.eval()(x), task.backbone.eval()(x))
    resumed = TinyTask()  # fit --ckpt_path: pruned again in setup, then rebuilt from the checkpoint
    _trainer(tmp_path, RANP(sparsity=0.6, n_batches=1, on_empty_layer="keep_top"), max_steps=3).fit(
        resumed, datamodule=TinyData(), ckpt_path=path
    )
    assert channel_spec(resumed.backbone) == checkpoint[CHECKPOINT_KEY]


@pytest.mark.slow
def test_callback_logs_a_wandb_table_and_plot(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = L.pytorch.loggers.WandbLogger(save_dir=str(tmp_path), offline=True, project="ranp-test")
    logged = []
    original = logger.log_table
    monkeypatch.setattr(logger, "log_table", lambda *a, **k: (logged.append(k), original(*a, **k)))
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[RANP(sparsity=0.3, n_batches=1)],
    )
    trainer.fit(TinyTask(), datamodule=TinyData())
    assert logged and logged[0]["key"] == "ranp/layers"
    assert [row[0] for row in logged[0]["data"]] == ["c1", "c2", "c3", "c4", "up", "c5", "out"]
    logger.experiment.finish()


def test_callback_is_seeded_whatever_the_global_rng(tmp_path):
    specs = []
    for global_seed in (10, 11):
        torch.manual_seed(12)
        task = TinyTask()
        torch.manual_seed(global_seed)
        _trainer(tmp_path, RANP(sparsity=0.4, n_batches=2, seed=3), max_steps=1).fit(
            task, datamodule=TinyData()
        )
        specs.append(channel_spec(task.backbone))
    assert specs[0] == specs[1]


def test_callback_rejects_bad_arguments():
    with pytest.raises(ValueError, match="sparsity"):
        RANP(sparsity=1.0)
    with pytest.raises(ValueError, match="unknown method"):
        RANP(method="magic")
    with pytest.raises(ValueError, match="n_batches"):
        RANP(n_batches=0)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize(
    "geometry",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": 3, "stride": 2, "padding": 0},
        {"kernel_size": 3, "dilation": 2, "padding": 2, "bias": False},
        {"kernel_size": 2, "stride": 2},
    ],
)
def test_fast_conv_weight_grad_equals_autograd(dim, geometry):
    torch.manual_seed(dim)
    convs = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    model = nn.Sequential(convs[dim](3, 5, **geometry), nn.ReLU(), convs[dim](5, 4, 1, groups=1)).double()
    depthwise = convs[dim](4, 4, 3, padding=1, groups=4).double()  # grouped: PyTorch's own backward
    x = torch.randn(2, 3, *[10] * dim, dtype=torch.double, requires_grad=True)
    params = [x, *model.parameters(), *depthwise.parameters()]

    def grads() -> list[torch.Tensor]:
        out = depthwise(model(x))
        return list(
            torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), params)
        )

    expected = grads()
    every_dim = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    with fast_conv_weight_grad(model, every_dim), fast_conv_weight_grad(depthwise, every_dim):
        assert "_conv_forward" in vars(model[0]) and "_conv_forward" not in vars(depthwise)
        got = grads()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert all("_conv_forward" not in vars(m) for m in [*model.modules(), depthwise])


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_fast_conv_weight_grad_defaults_to_3d_below_avx512_and_checks_types(monkeypatch, capability):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    net2d, net3d = nn.Conv2d(2, 3, 3), nn.Conv3d(2, 3, 3)
    with fast_conv_weight_grad(net2d), fast_conv_weight_grad(net3d):
        assert "_conv_forward" not in vars(net2d)  # oneDNN's own 2D weight pass is fast
        # below AVX-512 oneDNN's 3D weight pass is im2col + GEMM; on AVX-512 a direct JIT kernel
        assert ("_conv_forward" in vars(net3d)) == (capability == "AVX2")
    with fast_conv_weight_grad(net3d, (nn.Conv3d,)):
        assert "_conv_forward" in vars(net3d)
    with pytest.raises(ValueError, match="layer_types"):
        with fast_conv_weight_grad(net3d, (nn.Linear,)):
            pass


def test_fast_conv_weight_grad_keeps_the_importance(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # the formula's path
    torch.manual_seed(3)
    model = SkipNet(dim=3, width=4)
    batches = [{"image": torch.randn(2, 1, 8, 8, 8), "mask": torch.randint(0, 3, (2, 8, 8, 8))}]
    fast = parameter_mask_gradients(model, batches, ce_loss)
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv3d) and module.groups == 1:
            expected = per_neuron(
                module,
                (module.weight * torch.autograd.grad(ce_loss(model, batches[0]), module.weight)[0]).abs(),
            )
            torch.testing.assert_close(fast.absolute[name], expected, rtol=1e-4, atol=1e-7)
