"""Results: the format of a job dir's tables (:mod:`.schema`), the parquet sink of a job
(:mod:`.sink`), the loggers and W&B charts (:mod:`.loggers`, :mod:`.wandb_charts`), and the
figures and summaries that W&B and ``analysis/`` both draw with (:mod:`.figures`,
:mod:`.summary`, :mod:`.tidy`). Never imports :mod:`pfc_sweeps.jobs`."""
