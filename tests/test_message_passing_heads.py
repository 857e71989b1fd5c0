"""The message-passing heads: registry, thesis defaults, edge weights, gradients, configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from app.crf_heads import HEADS, ISGMR, SGM, TRWP, MeanField, create_head
from app.crf_heads.message_passing import canny_edge_weights
from app.ops import Pairwise, message_passing

ROOT = Path(__file__).resolve().parents[1]


def make_batch(batch: int = 2, size: int = 12) -> dict[str, torch.Tensor]:
    edges = torch.zeros(batch, size, size)
    edges[:, :, size // 2] = 1.0
    return {"edges": edges, "image_raw": torch.rand(batch, 3, size, size)}


def test_registered_names_and_thesis_defaults():
    assert {"isgmr", "trwp", "sgm", "meanfield"} <= set(HEADS.names())
    trwp, isgmr = create_head("trwp"), create_head("isgmr")
    assert isinstance(trwp, TRWP) and isinstance(isgmr, ISGMR)
    assert (trwp.n_directions, float(trwp.term_weight.detach()), trwp.n_iterations) == (4, 20.0, 5)
    assert (isgmr.n_directions, float(isgmr.term_weight.detach()), isgmr.n_iterations) == (8, 5.0, 5)


def test_canny_weights_cut_edges_across_image_edges():
    edges = torch.zeros(1, 4, 5)
    edges[0, :, 2] = 1.0
    weights = canny_edge_weights(edges, 4)
    assert weights.shape == (1, 2, 4, 5)
    horizontal = weights[0, 0]
    assert torch.equal(horizontal[:, 1], torch.zeros(4))  # (y, 1) - (y, 2) crosses the edge
    assert torch.equal(horizontal[:, 2], torch.zeros(4))  # (y, 2) - (y, 3)
    assert torch.equal(horizontal[:, 0], torch.ones(4))
    assert torch.equal(weights[0, 1, :3], torch.ones(3, 5))  # vertical edges run along it


def test_head_is_negated_message_passing():
    head = TRWP(edge_weights="none", learn_term_weight=False, n_iterations=2)
    logits = torch.randn(2, 3, 8, 9)
    expected = -message_passing(-logits, Pairwise("potts", 20.0), None, "trwp", 4, 2)
    torch.testing.assert_close(head(logits, {}), expected)
    assert not any(p.requires_grad for p in head.parameters())


@pytest.mark.parametrize("head_class", (ISGMR, TRWP, SGM, MeanField))
@pytest.mark.parametrize("edge_weights", ("canny", "learned", "none"))
def test_heads_train_end_to_end(head_class, edge_weights):
    head = head_class(edge_weights=edge_weights, term_weight=0.5, n_iterations=2, log_softmax=True)
    head.set_num_classes(3)
    logits = torch.randn(2, 3, 12, 12, requires_grad=True)
    batch = make_batch()
    head.check_batch(batch)
    out = head(logits, batch)
    assert out.shape == logits.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert logits.grad.abs().sum() > 0
    assert head.term_weight.grad is not None and head.term_weight.grad.abs() > 0
    if edge_weights == "learned":
        assert all(p.grad is not None for p in head.edge_net.parameters())


def test_missing_guidance_is_named():
    with pytest.raises(KeyError, match="edges"):
        TRWP().check_batch({"image_raw": torch.rand(1, 3, 4, 4)})
    with pytest.raises(KeyError, match="image_raw"):
        ISGMR(edge_weights="learned").check_batch({"edges": torch.rand(1, 4, 4)})


def test_bad_head_arguments():
    with pytest.raises(ValueError, match="edge_weights"):
        TRWP(edge_weights="sobel")
    with pytest.raises(ValueError, match="n_directions"):
        ISGMR(n_directions=6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ("trwp_shapes", "isgmr_shapes"))
def test_configs_build_the_head(name):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            "fit",
            "--config",
            str(ROOT / f"configs/{name}.yaml"),
            "--print_config",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    printed = yaml.safe_load(result.stdout)
    head = printed["model"]["init_args"]["head"]
    assert head["class_path"] == f"app.crf_heads.{name.split('_')[0].upper()}"
    assert head["init_args"]["edge_weights"] == "canny"
    assert printed["data"]["init_args"]["edges"] is True
