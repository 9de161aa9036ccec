"""Experiment loggers: one W&B run per job (offline by default), or none.

The W&B layout (what a run holds) is described in docs/wandb.md:

- history keys by metric: ``<metric>/layer_<ll>`` (layer zero-padded, so that W&B's default
  workspace draws one section per metric), run-level scalars by name (``train_acc``...),
  surrogate rows as ``<metric>/<model>`` (``<metric>/<model>/lam=<λ>`` for a λ grid);
- the x-axis of every key is ``epoch`` (training) or ``step`` (surrogate), declared with
  ``define_metric``; every row carries it, and W&B's own ``_step`` is left to count rows;
- charts: PFC1-3 of every layer against epoch (line series), each PFC metric against the
  relative depth with the geodesic prediction (depth profile), and the run's Fig. 2 / Fig. 3;
- tables: ``tables/results`` (every row of the results table, one row per (epoch, layer,
  model, λ) and a column per metric), ``tables/geodesic`` (the last curves),
  ``tables/final_by_lam`` (surrogate jobs);
- the summary holds the scalars a sweep is sorted by (:func:`train_summary`);
- the job's parquet tables as an Artifact of type ``results``.

Resume: an offline run cannot continue an earlier offline run (W&B writes a new
``offline-run-*`` directory, with the same run id, per process, and knows nothing of the
earlier ones); ``wandb sync`` of those directories uploads them in order of start time
into one run, appending each one's rows. A killed process may lose the rows it had handed
to W&B but not yet written. So a resumed training job first logs again every row of its
parquet table (online: only the epochs after the run's last logged ``epoch``), and at the
end any epoch of the table this process did not log: the union of the synced directories
then holds every row.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from pfc_sweeps.results.schema import (
    CHECKPOINT_FILE,
    CURVE_COLUMNS,
    CURVES_FILE,
    NET_MODEL,
    PFC_METRICS,
    RESULTS_FILE,
    RUN_LAYER,
    empty_frame,
    read_curves,
    read_table,
)

__all__ = [
    "NullLogger",
    "RunLogger",
    "WandbLogger",
    "layer_key",
    "make_logger",
    "rows_to_keys",
    "run_tags",
    "train_summary",
    "wandb_config",
]

log = logging.getLogger(__name__)

#: Config groups that only one kind of task reads: dropped from the other kind's W&B config
#: (``gaussian`` is read by surrogate jobs and by training on ``dataset=gaussian``).
_TRAIN_ONLY = ("dataset", "arch", "optim", "train")
_SURROGATE_ONLY = ("lam", "surrogate", "gaussian")
_SURROGATE_TASK = "surrogate"


class RunLogger(Protocol):
    def log_rows(self, rows: pd.DataFrame, step: int) -> None: ...

    def log_curves(self, curves: pd.DataFrame, step: int) -> None: ...

    def log_summary(self, table: pd.DataFrame, status: str) -> None: ...

    def finish(self, exit_code: int = 0) -> None: ...


# --------------------------------------------------------------------------- keys


def layer_key(metric: str, layer: int) -> str:
    """``pfc1/layer_03``: the history key of a per-layer metric (sections by metric)."""
    return f"{metric}/layer_{int(layer):02d}"


def rows_to_keys(rows: pd.DataFrame) -> dict[str, float]:
    """Map tidy rows to flat W&B history keys.

    Per layer: ``<metric>/layer_<ll>``; run level (layer = RUN_LAYER): the metric's name;
    surrogate rows: ``<metric>/<model>``, with ``/lam=<λ>`` when the rows hold several λ
    (the data rows, which do not depend on λ, never carry one).
    """
    out: dict[str, float] = {}
    many_lams = "lam" in rows and rows["lam"].nunique() > 1
    for r in rows.itertuples(index=False):
        model = getattr(r, "model", NET_MODEL)
        if model and model != NET_MODEL:
            key = f"{r.metric}/{model}"
            if many_lams and not math.isnan(r.lam):
                key = f"{key}/lam={r.lam:g}"
        elif r.layer != RUN_LAYER:
            key = layer_key(r.metric, r.layer)
        else:
            key = str(r.metric)
        out[key] = float(r.value)
    return out


# --------------------------------------------------------------------------- config, tags


def _is_surrogate(config: Mapping[str, Any]) -> bool:
    return (config.get("task") or {}).get("name") == _SURROGATE_TASK


def wandb_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config without the groups the job's task does not read.

    Training runs carry no ``lam`` / ``surrogate`` (their parquet has λ = NaN, so grouping a
    sweep by λ must not mix them in), and no ``gaussian`` unless they train on it; surrogate
    runs carry no data set, arch, optim, train.
    """
    if _is_surrogate(config):
        drop: tuple[str, ...] = _TRAIN_ONLY
    else:
        on_gaussian = (config.get("dataset") or {}).get("name") == "gaussian"
        drop = tuple(g for g in _SURROGATE_ONLY if not (on_gaussian and g == "gaussian"))
    return {k: v for k, v in config.items() if k not in drop}


def run_tags(config: Mapping[str, Any], extra: Iterable[str] = ()) -> list[str]:
    """``task:<name>``, ``dataset:<name>``, ``arch:<name>``, ``loss:<name>`` (+ ``extra``)."""
    task = (config.get("task") or {}).get("name", "train")
    loss = (config.get("loss") or {}).get("name")
    if _is_surrogate(config):
        models = (config.get("task") or {}).get("models") or [task]
        pairs = [("task", task), ("dataset", "gaussian"), ("arch", "+".join(models))]
    else:
        pairs = [
            ("task", task),
            ("dataset", (config.get("dataset") or {}).get("name")),
            ("arch", (config.get("arch") or {}).get("name")),
        ]
    tags = [f"{k}:{v}" for k, v in [*pairs, ("loss", loss)] if v]
    return [*tags, *(t for t in extra if t not in tags)]


# --------------------------------------------------------------------------- summary


def train_summary(
    table: pd.DataFrame, curves: pd.DataFrame | None = None
) -> dict[str, float | bool]:
    """The scalars a sweep of training runs is sorted and filtered by (one run's table).

    Final train/test accuracy, monotone flags, geodesic errors, effective depth,
    straightness and energy ratio as ``pfc_sweeps.results.summary.summarize_train`` computes them for
    ``summary.md``; and PFC1-3 at the first and last studied layer at the last metrics
    epoch, with their ratio last / first (``pfc1_first``, ``pfc1_last``, ``pfc1_ratio``...).
    """
    from pfc_sweeps.results.summary import summarize_train

    out: dict[str, float | bool] = {}
    rows = summarize_train(table, curves=curves)
    if len(rows):
        for k, v in rows.iloc[0].items():
            if k in ("run_id", "dataset", "arch", "loss", "seed"):
                continue
            if isinstance(v, bool | np.bool_) or (isinstance(v, float | int) and math.isfinite(v)):
                out[str(k)] = bool(v) if isinstance(v, bool | np.bool_) else float(v)
    layers = table.loc[(table["layer"] != RUN_LAYER) & table["metric"].isin(PFC_METRICS)]
    if layers.empty:
        return out
    last = layers.loc[layers["epoch"] == layers["epoch"].max()]
    lo, hi = last["layer"].min(), last["layer"].max()
    for m in PFC_METRICS:
        v = last.loc[last["metric"] == m].groupby("layer")["value"].mean()
        if lo in v and hi in v:
            out[f"{m}_first"], out[f"{m}_last"] = float(v[lo]), float(v[hi])
            if v[lo] != 0:
                out[f"{m}_ratio"] = float(v[hi] / v[lo])
    return out


# --------------------------------------------------------------------------- loggers


class NullLogger:
    """``logger=none``: logs nothing."""

    def log_rows(self, rows: pd.DataFrame, step: int) -> None:
        pass

    def log_curves(self, curves: pd.DataFrame, step: int) -> None:
        pass

    def log_summary(self, table: pd.DataFrame, status: str) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbLogger:
    """One W&B run per job: group = sweep id, job_type = task, id = the job's ``run_id``.

    The mode is ``logger.mode`` (offline by default) unless ``WANDB_MODE`` is set. Offline
    runs never touch the network; upload them later with ``wandb sync``. ``config`` is the
    resolved config; the run gets :func:`wandb_config` of it and :func:`run_tags`.
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

        from pfc_sweeps.results import wandb_charts

        self._wandb, self._charts = wandb, wandb_charts
        self.out_dir = Path(out_dir)
        self.surrogate = _is_surrogate(config)
        self.x = "step" if self.surrogate else "epoch"
        mode = os.environ.get("WANDB_MODE", mode)
        wandb_dir = os.environ.get("WANDB_DIR") or str(self.out_dir)
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
            config=wandb_config(config),
            dir=wandb_dir,
            tags=run_tags(config, tags or []),
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.run.define_metric(self.x)
        self.run.define_metric("*", step_metric=self.x)
        self._logged: set[int] = set()
        self._curves = empty_frame(CURVES_FILE)
        self._finished = False
        if not self.surrogate:
            self._replay()

    # ----------------------------------------------------------------- history
    def _log(self, values: Mapping[str, Any], step: int) -> None:
        self.run.log({self.x: int(step), **values})

    def log_rows(self, rows: pd.DataFrame, step: int) -> None:
        """Log one epoch's (or GD step's) tidy rows at x = ``step`` (see :func:`rows_to_keys`)."""
        keys = rows_to_keys(rows)
        if keys:
            self._log(keys, step)
            self._logged.add(int(step))

    def log_curves(self, curves: pd.DataFrame, step: int) -> None:
        """Take one epoch's geodesic curves (columns t, metric, value; the curves table's).

        The latest ones are drawn at the end of the job against the observed layers (the
        depth-profile charts) when the job directory holds no curves table.
        """
        c = curves.assign(epoch=int(step))
        self._curves = c[[col for col in CURVE_COLUMNS if col in c.columns]]

    def _replay(self) -> None:
        """A resumed training job: log again the rows of its table (see the module doc)."""
        path = self.out_dir / RESULTS_FILE
        if not ((self.out_dir / CHECKPOINT_FILE).exists() and path.exists()):
            return
        table = read_table(path)[0]
        after = self.run.summary.get(self.x) if self.run.resumed else None
        if isinstance(after, int | float):
            table = table.loc[table["epoch"] > after]
        self._log_epochs(table)

    def _log_epochs(self, rows: pd.DataFrame) -> None:
        for epoch, part in rows.groupby("epoch", sort=True):
            keys = rows_to_keys(part)
            if keys:
                self._log(keys, int(epoch))
                self._logged.add(int(epoch))

    # ----------------------------------------------------------------- end of job
    def log_summary(self, table: pd.DataFrame, status: str) -> None:
        """End of job: missed epochs, charts, figures, tables, summary and the artifact."""
        self.run.summary["status"] = status
        if table.empty:
            return
        rows = table
        curves = read_curves(self.out_dir)
        if curves.empty:
            curves = self._curves
        if not self.surrogate:
            self._log_epochs(rows.loc[~rows["epoch"].isin(self._logged)])
        last = int(rows["epoch"].max())
        charts = self._charts.end_of_job(rows, curves, surrogate=self.surrogate)
        charts["tables/results"] = self._charts.table(self._charts.wide_results(rows))
        if len(curves):
            at = curves.loc[
                curves["epoch"] == curves["epoch"].max(), ["epoch", "t", "metric", "value"]
            ]
            charts["tables/geodesic"] = self._charts.table(at)
        self._log(charts, last)
        summary = rows_to_keys(rows.loc[rows["epoch"] == rows["epoch"].max()])
        if not self.surrogate:
            summary.update(train_summary(rows, curves if len(curves) else None))
        summary[self.x] = last
        self.run.summary.update(summary)
        self._log_artifact()

    def _log_artifact(self) -> None:
        art = self._wandb.Artifact(f"results-{self.run.id}", type="results")
        for name in (RESULTS_FILE, CURVES_FILE):
            if (self.out_dir / name).exists():
                art.add_file(str(self.out_dir / name), name=name)
        self.run.log_artifact(art)

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
