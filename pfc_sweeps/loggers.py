"""Experiment loggers: one W&B run per job (offline by default), or none.

Keys: per-layer metrics as ``layer{l}/{metric}``, run-level scalars by name
(``train_acc``, ``effective_depth``...); surrogate rows as ``{model}/{metric}``, with
``/lam={λ}`` added when one job solves a λ grid. The whole tidy table goes to the run as a
``results`` table at the end, and the geodesic curves as a ``geodesic`` table.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

__all__ = ["NullLogger", "RunLogger", "WandbLogger", "make_logger", "rows_to_keys"]

log = logging.getLogger(__name__)


class RunLogger(Protocol):
    def log_rows(self, rows: pd.DataFrame, step: int) -> None: ...

    def log_summary(self, table: pd.DataFrame, status: str) -> None: ...

    def finish(self, exit_code: int = 0) -> None: ...


def rows_to_keys(rows: pd.DataFrame) -> dict[str, float]:
    """Map tidy rows to flat W&B keys (geodesic-curve rows are left to the tables)."""
    out: dict[str, float] = {}
    rows = rows[~rows["metric"].str.startswith("geodesic_pfc")]
    many_lams = "lam" in rows and rows["lam"].nunique() > 1
    for r in rows.itertuples(index=False):
        key = f"layer{r.layer}/{r.metric}" if r.layer >= 0 else str(r.metric)
        model = getattr(r, "model", "net")
        if model and model != "net":
            key = f"{model}/{key}"
            if many_lams and not math.isnan(r.lam):  # data rows (X) have no λ
                key = f"{model}/lam={r.lam:g}/{r.metric}"
        out[key] = float(r.value)
    return out


class NullLogger:
    """``logger=none``: logs nothing."""

    def log_rows(self, rows: pd.DataFrame, step: int) -> None:
        pass

    def log_summary(self, table: pd.DataFrame, status: str) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbLogger:
    """One W&B run per job: group = sweep id, job_type = task, config = resolved config.

    The mode is ``logger.mode`` (offline by default) unless ``WANDB_MODE`` is set. Offline
    runs never touch the network; upload them later with ``wandb sync``. The run id is the
    job's ``run_id``, so a requeued or resumed job continues the same run.
    """

    def __init__(
        self,
        *,
        project: str,
        entity: str | None,
        mode: str,
        run_id: str,
        group: str,
        job_type: str,
        name: str,
        config: Mapping[str, Any],
        out_dir: str | os.PathLike[str],
        tags: list[str] | None = None,
    ):
        import wandb

        self._wandb = wandb
        mode = os.environ.get("WANDB_MODE", mode)
        wandb_dir = os.environ.get("WANDB_DIR") or str(Path(out_dir))
        Path(wandb_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            entity=entity,
            mode=mode,
            id=run_id,
            resume="allow",
            group=group,
            job_type=job_type,
            name=name,
            config=dict(config),
            dir=wandb_dir,
            tags=tags or None,
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),
        )
        self._finished = False

    def log_rows(self, rows: pd.DataFrame, step: int) -> None:
        keys = rows_to_keys(rows)
        if keys:
            self.run.log(keys, step=int(step))

    def log_summary(self, table: pd.DataFrame, status: str) -> None:
        wandb = self._wandb
        self.run.summary["status"] = status
        if table.empty:
            return
        last = table[table["epoch"] == table["epoch"].max()]
        geo = last[last["metric"].str.startswith("geodesic_pfc")]
        if not geo.empty:
            cols = ["rel_pos", "metric", "value"]
            self.run.log(
                {"geodesic": wandb.Table(dataframe=geo[cols].rename(columns={"rel_pos": "t"}))}
            )
        cols = ["epoch", "layer", "rel_pos", "metric", "value", "model", "lam"]
        self.run.log({"results": wandb.Table(dataframe=last[cols].reset_index(drop=True))})
        for key, value in rows_to_keys(last).items():
            self.run.summary[key] = value

    def finish(self, exit_code: int = 0) -> None:
        if not self._finished:
            self._finished = True
            self.run.finish(exit_code=exit_code)


def make_logger(
    logger_cfg: Any,
    *,
    run_id: str,
    sweep_id: str,
    task: str,
    name: str,
    config: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
) -> RunLogger:
    """Build the logger that ``logger.name`` asks for (``wandb`` or ``none``)."""
    if logger_cfg.name == "none":
        return NullLogger()
    return WandbLogger(
        project=logger_cfg.project,
        entity=logger_cfg.entity,
        mode=logger_cfg.mode,
        run_id=run_id,
        group=sweep_id,
        job_type=task,
        name=name,
        config=config,
        out_dir=out_dir,
        tags=list(logger_cfg.tags),
    )
