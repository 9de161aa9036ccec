"""The surrogate task: solve the surrogate models over λ and record the rows.

``task.models`` lists the models solved on the same data X (``paper_fig4``: both);
``lam.grid``, when non-empty, is solved batched in one job, otherwise the single
``lam.lam`` (so ``-m lam.lam=a,b`` makes one job per λ). Every row's ``arch`` is its
``model`` (``mufm``, ``ufm``, or ``data`` for the rows of X).
"""

from __future__ import annotations

import pandas as pd

from pfc_sweeps.config import Config
from pfc_sweeps.data.builtin import gaussian_mixture
from pfc_sweeps.errors import Diverged
from pfc_sweeps.results.loggers import RunLogger
from pfc_sweeps.results.schema import RUN_LAYER
from pfc_sweeps.results.sink import ResultsSink, print_summary
from pfc_sweeps.surrogate.objective import SurrogateDivergedError
from pfc_sweeps.surrogate.solver import solve_grid

__all__ = ["run_surrogate"]


def run_surrogate(cfg: Config, sink: ResultsSink, logger: RunLogger) -> None:
    """Solve ``cfg.task.models`` on Gaussian data for every λ; rows go to ``sink``.

    Raises :class:`~pfc_sweeps.errors.Diverged` (status ``diverged``) when gradient descent
    produces non-finite values or its objective grows without bound.
    """
    s, g = cfg.surrogate, cfg.gaussian
    ((x, labels),) = gaussian_mixture(
        g.num_classes, g.dim, [g.n_per_class], sigma=g.sigma, seed=cfg.seed
    )
    X = x.T.contiguous()  # (d, N)
    lams = list(cfg.lam.grid) or [cfg.lam.lam]

    def stream(step: int, rows: pd.DataFrame) -> None:
        logger.log_rows(rows.assign(layer=RUN_LAYER), step=step)

    try:
        table = solve_grid(
            list(cfg.task.models),
            X,
            labels,
            g.num_classes,
            lams,
            lam_w=cfg.lam.lam_w,
            seed=cfg.seed,
            callback=stream,
            loss=cfg.loss.name,
            lr=s.lr,
            steps=s.steps,
            log_every=s.log_every,
            h_step=s.h_step,
            h_step_guard=s.h_step_guard,
        )
    except SurrogateDivergedError as e:
        raise Diverged(f"{e} (surrogate.lr={s.lr})") from e
    sink.add(table.assign(layer=RUN_LAYER, split="train", arch=table["model"]))
    _print_final(table, s.steps, sink)


def _print_final(table: pd.DataFrame, steps: int, sink: ResultsSink) -> None:
    last = table[table["epoch"] == table["epoch"].max()]
    # the data rows have lam = NaN (X does not depend on λ): show them as "-"
    lam = last["lam"].map(lambda v: "-" if pd.isna(v) else f"{v:g}")
    title = f"Surrogate metrics after {steps} steps:"
    print_summary(last.assign(lam=lam), ["model", "lam"], title, sink.path)
