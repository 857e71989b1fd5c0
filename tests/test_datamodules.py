"""Tests of the 2D datamodules (SyntheticShapes, VOCFolder) and their shared pieces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import RandomSampler, SequentialSampler

from app.datamodules import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VOC_CLASS_NAMES,
    SyntheticShapes,
    VOCFolder,
    build_augmentations,
    collate_segmentation,
    compute_edges,
    compute_superpixels,
    normalize,
)
from app.datamodules.common import build_transforms, is_deterministic


def small_shapes(**kwargs) -> SyntheticShapes:
    args = dict(image_size=32, n_train=8, n_val=4, n_test=4, batch_size=4)
    args.update(kwargs)
    dm = SyntheticShapes(**args)
    dm.setup()
    return dm


def assert_samples_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- SyntheticShapes


def test_shapes_deterministic_in_seed_split_index():
    a = small_shapes(seed=3).datasets
    b = small_shapes(seed=3).datasets
    assert_samples_equal(a["train"][2], b["train"][2])
    assert_samples_equal(a["test"][1], b["test"][1])
    assert not torch.equal(a["train"][2]["image_raw"], a["train"][3]["image_raw"])
    assert not torch.equal(a["train"][0]["image_raw"], a["val"][0]["image_raw"])
    c = small_shapes(seed=4).datasets
    assert not torch.equal(a["train"][2]["image_raw"], c["train"][2]["image_raw"])


def test_shapes_without_cache_regenerates_identically():
    cached = small_shapes(seed=1).datasets["val"]
    uncached = small_shapes(seed=1, cache=False).datasets["val"]
    assert_samples_equal(cached[3], uncached[3])
    assert_samples_equal(uncached[3], uncached[3])


def test_shapes_batch_contract():
    dm = small_shapes(num_classes=5)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "image_raw", "mask", "index"}
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["image_raw"].shape == (4, 3, 32, 32) and batch["image_raw"].dtype == torch.float32
    assert batch["mask"].shape == (4, 32, 32) and batch["mask"].dtype == torch.int64
    assert batch["index"].shape == (4,) and batch["index"].dtype == torch.int64
    assert batch["image_raw"].min() >= 0 and batch["image_raw"].max() <= 1
    assert batch["image_raw"].std() > 0.05
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(batch["image"], (batch["image_raw"] - mean) / std)
    assert batch["mask"].min() >= 0 and batch["mask"].max() < 5
    assert len(set(batch["index"].tolist())) == 4
    assert all(0 <= i < 8 for i in batch["index"].tolist())


def test_shapes_all_classes_present_and_names():
    dm = SyntheticShapes(num_classes=4, n_train=16, n_val=4, n_test=4)
    assert dm.num_classes == 4
    assert dm.class_names == ["background", "disc", "square", "triangle"]
    dm.setup("fit")
    seen = set()
    for i in range(16):
        seen |= set(dm.datasets["train"][i]["mask"].unique().tolist())
    assert seen == {0, 1, 2, 3}
    # Background plus at least one shape class in each image, shapes of a reasonable size.
    mask = dm.datasets["train"][0]["mask"]
    assert 0.02 < (mask > 0).float().mean() < 0.9


def test_shapes_noise_and_blur_arguments_change_images():
    clean = small_shapes(noise_std=0.0, blur_sigma=0.0).datasets["train"][0]
    noisy = small_shapes(noise_std=0.2, blur_sigma=0.0).datasets["train"][0]
    assert torch.equal(clean["mask"], noisy["mask"])
    diff = (noisy["image_raw"] - clean["image_raw"]).abs().mean()
    assert diff > 0.05
    # Without noise and blur a shape's interior is locally smooth; noise makes neighbours differ.
    rough = (noisy["image_raw"][:, :, 1:] - noisy["image_raw"][:, :, :-1]).abs().mean()
    smooth = (clean["image_raw"][:, :, 1:] - clean["image_raw"][:, :, :-1]).abs().mean()
    assert rough > 2 * smooth


def test_shapes_predict_uses_test_split():
    dm = SyntheticShapes(image_size=32, n_train=4, n_val=4, n_test=6, batch_size=3)
    dm.setup("predict")
    assert set(dm.datasets) == {"test"}
    batches = list(dm.predict_dataloader())
    assert sum(len(b["index"]) for b in batches) == 6
    assert_samples_equal(batches[0] | {}, collate_segmentation([dm.datasets["test"][i] for i in range(3)]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": 42}, "num_classes"),
        ({"n_val": 0}, "n_val"),
        ({"noise_std": -1.0}, "noise_std"),
        ({"batch_size": 0}, "batch_size"),
        ({"superpixels": 0}, "superpixels"),
    ],
)
def test_shapes_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticShapes(**kwargs)


def test_setup_unknown_stage():
    with pytest.raises(ValueError, match="stage"):
        SyntheticShapes().setup("training")


# ----------------------------------------------------------------------------- guidance


def test_superpixels_option_and_cache():
    dm = small_shapes(superpixels=20)
    ds = dm.datasets["val"]
    sample = ds[1]
    sp = sample["superpixels"]
    assert sp.shape == (32, 32) and sp.dtype == torch.int64
    assert sp.min() == 0 and 5 <= sp.max() + 1 <= 60
    expected = compute_superpixels(sample["image_raw"].permute(1, 2, 0).numpy(), 20)
    assert torch.equal(sp, torch.from_numpy(expected))
    # Deterministic pipeline: cached per index (the very same tensor comes back).
    assert ds[1]["superpixels"] is sp
    batch = next(iter(dm.val_dataloader()))
    assert batch["superpixels"].shape == (4, 32, 32) and batch["superpixels"].dtype == torch.int64


def test_superpixels_computed_on_augmented_image_and_not_cached():
    plain = small_shapes(superpixels=16).datasets["train"]
    ds = small_shapes(superpixels=16, train_augmentations=[{"name": "HorizontalFlip", "p": 0.5}]).datasets[
        "train"
    ]
    assert not ds.deterministic and plain.deterministic
    flipped_seen = False
    for _ in range(6):
        sample = ds[0]
        expected = compute_superpixels(sample["image_raw"].permute(1, 2, 0).numpy(), 16)
        assert torch.equal(sample["superpixels"], torch.from_numpy(expected))
        flipped_seen |= not torch.equal(sample["image_raw"], plain[0]["image_raw"])
    assert flipped_seen
    assert ds._guidance_cache == {}


def test_edges_option():
    dm = small_shapes(edges=True)
    sample = dm.datasets["train"][0]
    edges = sample["edges"]
    assert edges.shape == (32, 32) and edges.dtype == torch.float32
    assert set(edges.unique().tolist()) <= {0.0, 1.0}
    assert edges.sum() > 0
    expected = compute_edges(sample["image_raw"].permute(1, 2, 0).numpy())
    assert torch.equal(edges, torch.from_numpy(expected))
    batch = next(iter(dm.train_dataloader()))
    assert batch["edges"].shape == (4, 32, 32) and "superpixels" not in batch


def test_edges_follow_a_step():
    image = np.zeros((20, 20, 3))
    image[:, 10:] = 1.0
    edges = compute_edges(image)
    assert edges[5:15, 9:11].sum() >= 10
    assert edges[:, :7].sum() == 0 and edges[:, 13:].sum() == 0


def test_normalize_rejects_bad_shape():
    with pytest.raises(ValueError, match="image_raw"):
        normalize(torch.zeros(4, 8, 8))


# ----------------------------------------------------------------------------- augmentations


def test_flip_applied_to_image_and_mask_consistently():
    plain = small_shapes().datasets["train"][5]
    flipped = small_shapes(train_augmentations=[{"name": "HorizontalFlip", "p": 1.0}]).datasets["train"][5]
    assert not torch.equal(plain["mask"], flipped["mask"])
    assert torch.equal(flipped["image_raw"], plain["image_raw"].flip(-1))
    assert torch.equal(flipped["mask"], plain["mask"].flip(-1))
    assert torch.equal(flipped["image"], normalize(flipped["image_raw"]))


def test_augmentation_padding_fills_mask_with_ignore():
    augs = [{"name": "PadIfNeeded", "min_height": 40, "min_width": 40, "border_mode": 0}]
    dm = small_shapes(val_augmentations=augs)
    sample = dm.datasets["val"][0]
    assert sample["mask"].shape == (40, 40)
    assert (sample["mask"][:4] == 255).all() and (sample["mask"][:, :4] == 255).all()
    assert (sample["image_raw"][:, :4] == 0).all()
    assert (sample["mask"][4:36, 4:36] < 255).all()
    assert dm.datasets["val"].deterministic


def test_random_crop_from_config():
    dm = small_shapes(train_augmentations=[{"name": "RandomCrop", "height": 16, "width": 16}])
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["mask"].shape == (4, 16, 16)


def test_nested_one_of():
    compose = build_augmentations(
        [{"name": "OneOf", "p": 1.0, "transforms": [{"name": "HorizontalFlip"}, {"name": "VerticalFlip"}]}]
    )
    image = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    out = compose(image=image, mask=np.array([[0, 1], [2, 3]], dtype=np.uint8))
    assert out["mask"].tolist() in ([[1, 0], [3, 2]], [[2, 3], [0, 1]])


def test_unknown_augmentation_name():
    with pytest.raises(ValueError, match="FlipSideways"):
        SyntheticShapes(train_augmentations=[{"name": "HorizontalFlip"}, {"name": "FlipSideways"}])
    with pytest.raises(ValueError, match="Nope"):
        build_augmentations([{"name": "OneOf", "transforms": [{"name": "Nope"}]}])


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ([{"name": "HorizontalFlip", "q": 1}], "'q'"),
        ([{"p": 0.5}], "name"),
        (["HorizontalFlip"], "dict"),
        ([{"name": "RandomCrop", "height": -2, "width": 4}], "RandomCrop"),
        ({"name": "HorizontalFlip"}, "list"),
    ],
)
def test_bad_augmentation_configs(specs, message):
    with pytest.raises(ValueError, match=message):
        build_augmentations(specs)


def test_empty_augmentations():
    assert build_augmentations(None) is None
    assert build_augmentations([]) is None


# ----------------------------------------------------------------------------- collate and loaders


def test_collate_rejects_different_sizes():
    a = {"image": torch.zeros(3, 8, 8), "mask": torch.zeros(8, 8, dtype=torch.long)}
    b = {"image": torch.zeros(3, 8, 6), "mask": torch.zeros(8, 6, dtype=torch.long)}
    with pytest.raises(ValueError, match="different sizes") as info:
        collate_segmentation([a, b])
    assert "batch_size 1" in str(info.value) and "crop" in str(info.value)


def test_collate_rejects_mismatched_keys_and_empty():
    a = {"image": torch.zeros(3, 8, 8)}
    b = {"image": torch.zeros(3, 8, 8), "edges": torch.zeros(8, 8)}
    with pytest.raises(ValueError, match="keys"):
        collate_segmentation([a, b])
    with pytest.raises(ValueError, match="empty"):
        collate_segmentation([])


def test_loaders_shuffle_train_only_and_are_reproducible():
    dm = small_shapes()
    assert isinstance(dm.train_dataloader().sampler, RandomSampler)
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        assert isinstance(loader.sampler, SequentialSampler)
    assert [b["index"].tolist() for b in dm.val_dataloader()] == [[0, 1, 2, 3]]
    order = [b["index"].tolist() for b in small_shapes().train_dataloader()]
    assert order == [b["index"].tolist() for b in small_shapes().train_dataloader()]
    assert sorted(sum(order, [])) == list(range(8))
    assert not dm.train_dataloader().persistent_workers


def test_worker_seeding_reproducible_augmentation():
    augs = [{"name": "HorizontalFlip", "p": 0.5}, {"name": "RandomCrop", "height": 24, "width": 24}]

    def first_batch():
        dm = small_shapes(num_workers=1, train_augmentations=augs)
        loader = dm.train_dataloader()
        assert loader.persistent_workers
        return next(iter(loader))

    assert_samples_equal(first_batch(), first_batch())


def test_loader_before_setup_raises():
    with pytest.raises(RuntimeError, match="setup"):
        SyntheticShapes().train_dataloader()


# ----------------------------------------------------------------------------- VOC folder


def palette_png(path: Path, mask: np.ndarray) -> None:
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[:21] = np.random.default_rng(0).integers(0, 256, size=(21, 3))
    palette[255] = 224
    img.putpalette(palette.flatten().tolist())
    img.save(path)


def write_voc(root: Path, sizes: dict[str, tuple[int, int]], splits: dict[str, list[str]]) -> dict:
    """A tiny VOC folder: JPEG images, palette PNG masks (rectangles of class id, 255 borders), lists."""
    rng = np.random.default_rng(1)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    masks = {}
    for i, (sample_id, (h, w)) in enumerate(sizes.items()):
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "JPEGImages" / f"{sample_id}.jpg", quality=95)
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[h // 4 : h // 2, w // 4 : w // 2] = 1 + i % 20
        mask[0, :] = 255
        palette_png(root / "SegmentationClass" / f"{sample_id}.png", mask)
        masks[sample_id] = mask
    for split, ids in splits.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return masks


@pytest.fixture
def voc_root(tmp_path: Path) -> tuple[Path, dict]:
    sizes = {"a": (40, 48), "b": (24, 20), "c": (36, 36), "d": (30, 44), "e": (28, 26)}
    masks = write_voc(tmp_path / "voc", sizes, {"train": ["a", "b", "c"], "val": ["d", "e"]})
    return tmp_path / "voc", masks


def test_voc_loads(voc_root):
    root, masks = voc_root
    dm = VOCFolder(str(root), crop_size=32, batch_size=3, superpixels=10, edges=True)
    assert dm.num_classes == 21 and dm.class_names == list(VOC_CLASS_NAMES)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (3, 3, 32, 32) and batch["mask"].shape == (3, 32, 32)
    assert batch["superpixels"].shape == (3, 32, 32) and batch["edges"].shape == (3, 32, 32)
    assert batch["mask"].dtype == torch.int64
    assert set(batch["mask"].unique().tolist()) <= {0, 1, 2, 3, 255}
    # Sample "b" (24 x 20) is smaller than the crop: padded with 0 (image) and 255 (mask).
    b = dm.datasets["train"][1]
    assert (b["mask"] == 255).sum() >= 32 * 32 - 24 * 20
    padded = (b["mask"] == 255) & (b["image_raw"].sum(0) == 0)
    assert padded.sum() >= 32 * 32 - 24 * 20
    # Validation keeps the original size and the exact mask.
    val = dm.datasets["val"][0]
    assert val["image"].shape == (3, 30, 44)
    assert torch.equal(val["mask"], torch.from_numpy(masks["d"]).long())
    val_batch = next(iter(dm.val_dataloader()))
    assert val_batch["index"].tolist() == [0]


def test_voc_image_matches_jpeg(voc_root):
    root, _ = voc_root
    dm = VOCFolder(str(root), crop_size=None)
    dm.setup("validate")
    sample = dm.datasets["val"][1]
    jpeg = np.asarray(Image.open(root / "JPEGImages" / "e.jpg").convert("RGB"), dtype=np.float32) / 255
    torch.testing.assert_close(sample["image_raw"], torch.from_numpy(jpeg).permute(2, 0, 1))


def test_voc_test_split_falls_back_to_val_then_uses_test_list(voc_root):
    root, _ = voc_root
    dm = VOCFolder(str(root))
    dm.setup("test")
    assert dm.datasets["test"].ids == ["d", "e"]
    (root / "ImageSets" / "Segmentation" / "test.txt").write_text("a\n")
    dm = VOCFolder(str(root))
    dm.setup("predict")
    assert dm.datasets["test"].ids == ["a"]
    assert next(iter(dm.predict_dataloader()))["image"].shape == (1, 3, 40, 48)


def test_voc_different_sizes_in_batch_raise(voc_root):
    root, _ = voc_root
    dm = VOCFolder(str(root), val_batch_size=2)
    dm.setup("validate")
    with pytest.raises(ValueError, match="different sizes"):
        next(iter(dm.val_dataloader()))


def test_voc_missing_root_and_list(tmp_path, voc_root):
    with pytest.raises(FileNotFoundError, match="missing_root"):
        VOCFolder(str(tmp_path / "missing_root"))
    root, _ = voc_root
    (root / "ImageSets" / "Segmentation" / "val.txt").unlink()
    dm = VOCFolder(str(root))
    with pytest.raises(FileNotFoundError, match="val.txt"):
        dm.setup("fit")


def test_voc_image_without_mask(voc_root):
    root, _ = voc_root
    (root / "SegmentationClass" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match="image without a mask") as info:
        VOCFolder(str(root)).setup("fit")
    assert str(root / "JPEGImages" / "b.jpg") in str(info.value)
    assert str(root / "SegmentationClass" / "b.png") in str(info.value)


def test_voc_listed_id_without_image(voc_root):
    root, _ = voc_root
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nzzz\n")
    with pytest.raises(FileNotFoundError, match="zzz"):
        VOCFolder(str(root)).setup("fit")


def test_voc_corrupt_image(voc_root):
    root, _ = voc_root
    path = root / "JPEGImages" / "c.jpg"
    path.write_bytes(b"this is not a jpeg" * 10)
    dm = VOCFolder(str(root))
    dm.setup("fit")
    with pytest.raises(OSError, match="c.jpg") as info:
        dm.datasets["train"][2]
    assert str(path) in str(info.value)


def test_voc_mask_id_out_of_range(voc_root):
    root, _ = voc_root
    mask = np.zeros((40, 48), dtype=np.uint8)
    mask[5:9, 5:9] = 30
    mask[10:12, 10:12] = 255
    path = root / "SegmentationClass" / "a.png"
    palette_png(path, mask)
    dm = VOCFolder(str(root))
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"\[30\]") as info:
        dm.datasets["train"][0]
    assert str(path) in str(info.value)
    # With fewer classes, ids of the untouched masks become out of range too.
    dm = VOCFolder(str(root), num_classes=2)
    dm.setup("validate")
    with pytest.raises(ValueError, match="num_classes=2"):
        dm.datasets["val"][1]


def test_voc_class_names_argument(voc_root):
    root, _ = voc_root
    assert VOCFolder(str(root), num_classes=3).class_names == ["class_0", "class_1", "class_2"]
    with pytest.raises(ValueError, match="class_names"):
        VOCFolder(str(root), num_classes=3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="superpixels"):
        VOCFolder(str(root), superpixels=0)
    with pytest.raises(ValueError, match="crop_size"):
        VOCFolder(str(root), crop_size=0)
    with pytest.raises(ValueError, match="Blur9"):
        VOCFolder(str(root), val_augmentations=[{"name": "Blur9"}])


def test_is_deterministic():
    assert is_deterministic([])
    assert is_deterministic(build_transforms([{"name": "CenterCrop", "height": 8, "width": 8}]))
    assert not is_deterministic(build_transforms([{"name": "ToGray"}]))  # default p = 0.5
    assert not is_deterministic(build_transforms([{"name": "HorizontalFlip", "p": 1.0}]))
    pad = {"name": "PadIfNeeded", "min_height": 8, "min_width": 8, "position": "random"}
    assert not is_deterministic(build_transforms([pad]))


def test_trainer_fast_dev_run_consumes_batches():
    import lightning as L

    class PixelClassifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)
            self.seen: list[str] = []

        def _loss(self, batch: dict, stage: str) -> torch.Tensor:
            self.seen.append(stage)
            assert set(batch) >= {"image", "image_raw", "mask", "index", "edges"}
            logits = self.conv(batch["image"])
            return torch.nn.functional.cross_entropy(logits, batch["mask"], ignore_index=255)

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            return self._loss(batch, "train")

        def validation_step(self, batch: dict, batch_idx: int) -> None:
            self._loss(batch, "val")

        def test_step(self, batch: dict, batch_idx: int) -> None:
            self._loss(batch, "test")

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = SyntheticShapes(image_size=32, n_train=8, n_val=4, n_test=4, batch_size=4, edges=True)
    model = PixelClassifier()
    trainer = L.Trainer(
        fast_dev_run=True,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    assert model.seen == ["train", "val", "test"]
