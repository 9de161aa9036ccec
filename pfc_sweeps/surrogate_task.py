"""The ``mufm`` / ``ufm`` tasks: solve the surrogate models over λ and record the rows.

``task.models`` lists the models solved on the same data X (``paper_fig4``: both);
``lam.grid``, when non-empty, is solved batched in one job, otherwise the single
``lam.lam`` (so ``-m lam.lam=a,b`` makes one job per λ).
"""

from __future__ import annotations

import pandas as pd

from .config import Config
from .data import gaussian_mixture
from .errors import Diverged
from .loggers import RunLogger
from .results import ResultsSink, print_summary
from .surrogate import SurrogateDivergedError, solve_grid

__all__ = ["run_surrogate"]


def run_surrogate(cfg: Config, sink: ResultsSink, logger: RunLogger) -> None:
    """Solve ``cfg.task.models`` on Gaussian data for every λ; rows go to ``sink``."""
    s, g = cfg.surrogate, cfg.gaussian
    ((x, labels),) = gaussian_mixture(
        g.num_classes, g.dim, [g.n_per_class], sigma=g.sigma, seed=cfg.seed
    )
    X = x.T.contiguous()  # (d, N)
    lams = list(cfg.lam.grid) or [cfg.lam.lam]

    def stream(step: int, rows: pd.DataFrame) -> None:
        logger.log_rows(rows.assign(layer=-1), step=step)

    try:
        table = _solve(cfg, X, labels, lams, stream)
    except SurrogateDivergedError as e:
        raise Diverged(str(e)) from e
    sink.add(table.assign(layer=-1, split="train"))
    _print_final(table, s.steps, sink)


def _solve(cfg: Config, X, labels, lams, stream) -> pd.DataFrame:
    s = cfg.surrogate
    return solve_grid(
        list(cfg.task.models),
        X,
        labels,
        cfg.gaussian.num_classes,
        lams,
        lam_w=cfg.lam.lam_w,
        loss=cfg.loss.name,
        lr=s.lr,
        steps=s.steps,
        log_every=s.log_every,
        h_step=s.h_step,
        h_step_guard=s.h_step_guard,
        seed=cfg.seed,
        callback=stream,
    )


def _print_final(table: pd.DataFrame, steps: int, sink: ResultsSink) -> None:
    last = table[table["epoch"] == table["epoch"].max()]
    # the data rows have lam = NaN (X does not depend on λ): show them as "-"
    lam = last["lam"].map(lambda v: "-" if pd.isna(v) else f"{v:g}")
    title = f"Surrogate metrics after {steps} steps:"
    print_summary(last.assign(lam=lam), ["model", "lam"], title, sink.path)
