import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import wandb
import yaml
from wandb_history import history

from app.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    },
    "model": {
        "class_path": "app.models.SegmentationTask",
        "init_args": {
            "backbone": {
                "class_path": "app.models.SMPBackbone",
                "init_args": {
                    "arch": "Unet",
                    "encoder_name": "resnet18",
                    "arch_kwargs": {"decoder_channels": [32, 16, 16, 8, 8]},
                },
            },
            "lr": 0.002,
        },
    },
    "data": {
        "class_path": "app.datamodules.SyntheticShapes",
        "init_args": {"image_size": 32, "n_train": 8, "n_val": 8, "n_test": 4, "batch_size": 4},
    },
}


def write_config(tmp_path: Path, logger: dict, **trainer) -> Path:
    config = yaml.safe_load(yaml.safe_dump(TINY))
    config["trainer"].update(default_root_dir=str(tmp_path), logger=logger, **trainer)
    config["trainer"]["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(tmp_path / "ckpt"),
                "monitor": "val/mIoU",
                "mode": "max",
                "save_last": True,
            },
        }
    ]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def csv_logger(tmp_path: Path, name: str = "run") -> dict:
    return {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(tmp_path), "name": name},
    }


def last_metrics(tmp_path: Path, name: str, key: str) -> list[float]:
    rows = []
    for metrics_file in sorted((tmp_path / name).glob("version_*/metrics.csv")):
        with metrics_file.open() as handle:
            rows += [float(row[key]) for row in csv.DictReader(handle) if row.get(key)]
    return rows


def test_print_config_documents_every_option():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            "fit",
            "--config",
            str(ROOT / "configs/quickstart.yaml"),
            "--print_config",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    printed = yaml.safe_load(result.stdout)
    task = printed["model"]["init_args"]
    assert task["backbone"]["init_args"]["arch"] == "Unet"
    assert task["head"] is None
    for option in ("lr", "head_lr", "aux_loss_weight", "ignore_index", "scheduler"):
        assert option in task
    assert printed["data"]["class_path"] == "app.datamodules.SyntheticShapes"


def test_console_script_is_installed():
    result = subprocess.run(["lightning", "fit", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout and "--ckpt_path" in result.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.init_args.no_such_option=1", "no_such_option"),
        ("--data=app.datamodules.NoSuchData", "NoSuchData"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, capsys, override, message):
    config = write_config(tmp_path, logger=False)
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(config), override])
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err


def test_fit_then_resume_from_last_checkpoint(tmp_path):
    config = write_config(tmp_path, logger=csv_logger(tmp_path))
    first = build_cli(["fit", "--config", str(config)])
    steps_per_epoch = first.trainer.global_step
    assert steps_per_epoch == 2
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    resumed = build_cli(["fit", "--config", str(config), "--trainer.max_epochs=2", "--ckpt_path=last"])
    assert resumed.trainer.current_epoch == 2
    assert resumed.trainer.global_step == 2 * steps_per_epoch  # continued, not restarted
    validated = build_cli(
        ["validate", "--config", str(config), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")]
    )
    assert 0.0 <= float(validated.trainer.callback_metrics["val/mIoU"]) <= 1.0
    predicted = build_cli(
        ["predict", "--config", str(config), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")]
    )
    (first_batch, *_) = predicted.trainer.predict_loop.predictions
    assert first_batch["prediction"].shape == (4, 32, 32)
    assert int(first_batch["prediction"].max()) < 4


def test_wandb_offline_run_has_miou_and_image_panels(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {"project": "test", "save_dir": str(tmp_path), "offline": True},
    }
    config = write_config(tmp_path, logger=logger)
    build_cli(["fit", "--config", str(config)])
    wandb.finish()  # a CLI process does this at exit; here the test reads the run file right away
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = history(run_file)
    assert any("val/mIoU" in row for row in rows)
    panels = [row for row in rows if "val/examples/all_masks" in row]
    assert panels, "no image panel was logged"
    assert "ground_truth" in str(panels[0]["val/examples/all_masks"])
    assert "prediction" in str(panels[0]["val/examples/all_masks"])
    assert list(run_file.parent.glob("files/media/images/val/*.png"))


def test_ddp_on_two_cpu_processes_syncs_metrics(tmp_path):
    config = write_config(tmp_path, logger=csv_logger(tmp_path, "ddp"))
    command = [sys.executable, "-m", "app", "fit", "--config", str(config)]
    command += ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (ddp_miou,) = last_metrics(tmp_path, "ddp", "val/mIoU")
    # One process on the same weights and the whole validation split must give the same dataset-level mIoU.
    single = build_cli(
        [
            "validate",
            "--config",
            str(config),
            "--trainer.logger=false",
            "--ckpt_path",
            str(tmp_path / "ckpt" / "last.ckpt"),
        ]
    )
    torch.testing.assert_close(
        float(single.trainer.callback_metrics["val/mIoU"]), ddp_miou, rtol=1e-5, atol=1e-6
    )
