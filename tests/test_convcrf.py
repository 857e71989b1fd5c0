from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from app.cli import build_cli
from app.crf_heads import HEADS, ConvCRF, create_head
from app.ops.reference import gaussian_message_reference

ROOT = Path(__file__).resolve().parents[1]


def batch_of(image):
    return {"image_raw": image}


def test_registered_and_exported():
    assert "convcrf" in HEADS
    assert isinstance(create_head("convcrf", filter_size=5), ConvCRF)


@pytest.mark.parametrize(("height", "width", "blur"), [(32, 32, 4), (29, 23, 4), (17, 30, 3), (9, 7, 1)])
def test_any_input_size(height, width, blur):
    head = ConvCRF(filter_size=5, blur=blur, n_iterations=2)
    head.set_num_classes(3)
    logits = torch.randn(2, 3, height, width)
    out = head(logits, batch_of(torch.rand(2, 3, height, width)))
    assert out.shape == logits.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("height", "width", "blur"), [(29, 23, 4), (17, 30, 3), (13, 13, 2)])
def test_blur_that_does_not_divide_pads_like_a_padded_input(height, width, blur):
    """One iteration on an (H, W) not divisible by blur equals the run on the replicate-padded input, cropped."""
    head = ConvCRF(filter_size=5, blur=blur, n_iterations=1, theta_alpha=10.0, theta_beta=0.3)
    head.set_num_classes(3)
    logits = torch.randn(2, 3, height, width, dtype=torch.float64)
    image = torch.rand(2, 3, height, width, dtype=torch.float64)
    pad = (0, -width % blur, 0, -height % blur)
    padded = head(F.pad(logits, pad, mode="replicate"), batch_of(F.pad(image, pad, mode="replicate")))
    torch.testing.assert_close(head(logits, batch_of(image)), padded[..., :height, :width])


def test_blur_that_does_not_divide_gives_gradients():
    head = ConvCRF(filter_size=5, blur=4, n_iterations=2, learnable_compatibility=True, learn_features=True)
    head.set_num_classes(3)
    logits = torch.randn(1, 3, 19, 26, requires_grad=True)
    image = torch.rand(1, 3, 19, 26, requires_grad=True)
    F.cross_entropy(head(logits, batch_of(image)), torch.randint(0, 3, (1, 19, 26))).backward()
    assert logits.grad.shape == logits.shape and torch.isfinite(logits.grad).all()
    assert logits.grad[..., -1, -1].abs().sum() > 0  # the last row and column, inside the padding's cell
    assert image.grad is not None and torch.isfinite(image.grad).all()


def test_matches_mean_field_written_with_the_reference():
    """blur = 1: Alg. 1 spelled out with the unfold reference of Eq. 6."""
    head = ConvCRF(filter_size=5, blur=1, n_iterations=3, theta_alpha=6.0, theta_beta=0.2, theta_gamma=2.0)
    head.set_num_classes(4)
    logits = torch.randn(1, 4, 12, 10, dtype=torch.float64)
    image = torch.rand(1, 3, 12, 10, dtype=torch.float64)
    rows, columns = torch.meshgrid(torch.arange(12.0), torch.arange(10.0), indexing="ij")
    position = torch.stack([rows, columns])[None].double()
    appearance = torch.cat([position / 6.0, image / 0.2], dim=1)
    expected = logits
    for _ in range(3):
        q = expected.softmax(1)
        message = 10.0 * gaussian_message_reference(q, appearance, 5)
        message = message + 3.0 * gaussian_message_reference(q, position / 2.0, 5)
        expected = logits + message
    # the bandwidths are stored as float32 logs: exp(log(theta)) is exact to ~1e-7 only
    torch.testing.assert_close(head.double()(logits, batch_of(image)), expected, atol=1e-5, rtol=1e-5)


def test_zero_weights_return_the_unary():
    head = ConvCRF(appearance_weight=0.0, smoothness_weight=0.0)
    logits = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(head(logits, batch_of(torch.rand(1, 3, 16, 16))), logits)


def test_learnable_extras_start_from_the_baseline():
    logits, image = torch.randn(2, 3, 20, 24), torch.rand(2, 3, 20, 24)
    plain = ConvCRF(n_iterations=2)
    plain.set_num_classes(3)
    extended = ConvCRF(n_iterations=2, learnable_compatibility=True, learn_features=True)
    extended.set_num_classes(3)
    assert extended.compatibility is not None and extended.feature_transform is not None
    torch.testing.assert_close(extended(logits, batch_of(image)), plain(logits, batch_of(image)))


def test_all_parameters_get_gradients():
    head = ConvCRF(filter_size=5, blur=2, n_iterations=2, learnable_compatibility=True, learn_features=True)
    head.set_num_classes(3)
    logits = torch.randn(1, 3, 14, 18, requires_grad=True)
    F.cross_entropy(
        head(logits, batch_of(torch.rand(1, 3, 14, 18))), torch.randint(0, 3, (1, 14, 18))
    ).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_frozen_kernels_have_no_trainable_parameters():
    head = ConvCRF(learn_kernels=False)
    head.set_num_classes(3)
    assert not any(p.requires_grad for p in head.parameters())


def test_restores_flipped_labels_along_colour_edges():
    """Sec. 5.1 in miniature: a coarse, partly wrong unary on a two-colour image gets closer to the truth."""
    generator = torch.Generator().manual_seed(0)
    truth = torch.zeros(1, 48, 48, dtype=torch.long)
    truth[:, 10:38, 14:40] = 1
    image = truth[:, None].float().expand(1, 3, 48, 48).clone()
    coarse = F.interpolate(truth[:, None].float(), scale_factor=1 / 8, mode="nearest").long()[:, 0]
    flip = torch.rand(coarse.shape, generator=generator) < 0.2
    noisy = torch.where(flip, 1 - coarse, coarse)
    noisy = F.interpolate(noisy[:, None].float(), size=(48, 48), mode="nearest").long()[:, 0]
    logits = F.one_hot(noisy, 2).permute(0, 3, 1, 2).float() * 2.0
    refined = ConvCRF()(logits, batch_of(image)).argmax(1)  # FullCRF defaults, k = 7, blur 4
    assert (noisy == truth).float().mean() < 0.7
    assert (refined == truth).float().mean() > 0.95


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"filter_size": 6}, "filter_size"),
        ({"filter_size": 1}, "filter_size"),
        ({"blur": 0}, "blur"),
        ({"n_iterations": 0}, "n_iterations"),
        ({"theta_beta": 0.0}, "theta_beta"),
        ({"theta_gamma": float("nan")}, "theta_gamma"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ConvCRF(**kwargs)


def test_bad_batch():
    head = ConvCRF()
    with pytest.raises(KeyError, match="image_raw"):
        head(torch.randn(1, 3, 8, 8), {})
    with pytest.raises(ValueError, match="image_raw"):
        head(torch.randn(1, 3, 8, 8), batch_of(torch.rand(1, 3, 8, 9)))
    with pytest.raises(ValueError, match="features"):
        head(torch.randn(1, 3, 8, 8), batch_of(torch.full((1, 3, 8, 8), float("nan"))))


def test_learnable_compatibility_needs_num_classes():
    with pytest.raises(RuntimeError, match="set_num_classes"):
        ConvCRF(learnable_compatibility=True)(torch.randn(1, 3, 8, 8), batch_of(torch.rand(1, 3, 8, 8)))


@pytest.mark.cuda
def test_cuda_matches_cpu():
    head = ConvCRF(n_iterations=2)
    head.set_num_classes(3)
    logits, image = torch.randn(2, 3, 37, 41), torch.rand(2, 3, 37, 41)
    expected = head(logits, batch_of(image))
    result = head.cuda()(logits.cuda(), batch_of(image.cuda()))
    torch.testing.assert_close(result.cpu(), expected, atol=1e-4, rtol=1e-4)


def tiny_config(tmp_path, name, **model_args):
    """The repository's config with its model and head as is, on a tiny dataset and a CSV logger."""
    config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    config["trainer"].update(
        accelerator="cpu",
        max_epochs=1,
        default_root_dir=str(tmp_path),
        logger={
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(tmp_path)},
        },
        callbacks=[],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    config["data"]["init_args"].update(image_size=32, n_train=4, n_val=2, n_test=2, batch_size=2)
    config["model"]["init_args"].update(model_args)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("name", ["convcrf_shapes", "convcrf_decoupled"])
def test_configs_build_the_head(tmp_path, name):
    cli = build_cli(["--config", str(tiny_config(tmp_path, name))], run=False)
    head = cli.model.head
    assert isinstance(head, ConvCRF) and head.compatibility is not None and head.feature_transform is not None
    assert cli.model.hparams.freeze_backbone == (name == "convcrf_decoupled")


@pytest.mark.slow
def test_configs_end_to_end_then_decoupled(tmp_path):
    end_to_end = build_cli(["fit", "--config", str(tiny_config(tmp_path, "convcrf_shapes"))])
    assert "val/mIoU_backbone" in end_to_end.trainer.callback_metrics
    unary = tmp_path / "unary.ckpt"
    end_to_end.trainer.save_checkpoint(unary)
    config = tiny_config(tmp_path, "convcrf_decoupled", backbone_checkpoint=str(unary))
    decoupled = build_cli(["fit", "--config", str(config)])
    backbone = decoupled.model.backbone
    assert not any(p.requires_grad for p in backbone.parameters())
    for key, value in backbone.state_dict().items():  # frozen: still the loaded unary after training
        torch.testing.assert_close(value, end_to_end.model.backbone.state_dict()[key])
    assert decoupled.model.head.log_bandwidths.requires_grad
