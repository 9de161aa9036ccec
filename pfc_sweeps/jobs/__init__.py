"""Running one job: the checks before Hydra starts (:mod:`.cli`), the job dir and its lock
(:mod:`.jobdir`), the dispatch on ``task.name`` (:mod:`.dispatch`), the tasks
(:mod:`.train`, :mod:`.measure`, :mod:`.surrogate`), building their objects (:mod:`.build`),
training speed options (:mod:`.accel`), checkpoints (:mod:`.checkpoint`) and the Hydra
callbacks (:mod:`.callbacks`)."""
