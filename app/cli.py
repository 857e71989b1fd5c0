"""The command line: ``lightning fit --config configs/<experiment>.yaml`` (also ``python -m app ...``).

Built on LightningCLI: ``fit``, ``validate``, ``test`` and ``predict`` subcommands, every class given by
``class_path`` / ``init_args`` in the YAML, and ``--print_config`` to document all options. The class
count and names are linked from the datamodule into the task and its backbone, so a config states them
once, in ``data``.
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


class AppCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments(
            "data.num_classes", "model.init_args.backbone.init_args.num_classes", apply_on="instantiate"
        )
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")


def build_cli(args: list[str] | None = None, run: bool = True) -> AppCLI:
    """Parse ``args`` (default: ``sys.argv``), build model, data and trainer, and run the subcommand."""
    return AppCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning`` console script and of ``python -m app``."""
    build_cli(args)


if __name__ == "__main__":
    main()
