"""``python -m dtp_search [overrides]`` — run (or resume) a pruning-policy search."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
import optuna
from omegaconf import DictConfig

from dtp_search.config import ConfigError, register_resolvers

# MLflow 3 reports usage telemetry by default; a tool that runs on clusters and offline
# machines should not phone home unless the user asks (set it to "false" to allow).
# Set before run_study imports mlflow.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
register_resolvers()
log = logging.getLogger("dtp_search")
# An absolute path: a relative one would be read as a package path when this module is
# imported (the `dtp-search` console script) rather than run with `python -m`.
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _app(cfg: DictConfig) -> None:
    from dtp_search.data import DatasetError
    from dtp_search.study import run_study

    # Heartbeats and metric names are marked experimental in Optuna but are the
    # supported way to retry dead trials and label objectives; the warning is noise here.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar reports trials
    try:
        run_study(cfg)
    except (ConfigError, DatasetError) as exc:
        if os.environ.get("DTP_SEARCH_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
