"""W&B key names from tidy rows (pfc_sweeps.loggers.rows_to_keys)."""

from __future__ import annotations

import math

import pandas as pd

from pfc_sweeps.loggers import rows_to_keys


def _rows(records):
    return pd.DataFrame(records, columns=["layer", "metric", "value", "model", "lam"])


def test_train_rows_become_layer_keys_and_scalars():
    keys = rows_to_keys(
        _rows(
            [
                (0, "pfc1", 1.5, "net", math.nan),
                (3, "pfc1", 0.5, "net", math.nan),
                (-1, "train_acc", 1.0, "net", math.nan),
                (-1, "geodesic_pfc1", 0.7, "net", math.nan),  # curves go to a table
            ]
        )
    )
    assert keys == {"layer0/pfc1": 1.5, "layer3/pfc1": 0.5, "train_acc": 1.0}


def test_surrogate_grid_keys_name_the_lambda_but_not_for_the_data():
    keys = rows_to_keys(
        _rows(
            [
                (-1, "pfc1", 3.0, "mufm", 0.001),
                (-1, "pfc1", 4.0, "mufm", 0.002),
                (-1, "pfc1", 20.0, "data", math.nan),
            ]
        )
    )
    assert keys == {"mufm/lam=0.001/pfc1": 3.0, "mufm/lam=0.002/pfc1": 4.0, "data/pfc1": 20.0}
    # a single λ: no λ in the key
    single = rows_to_keys(_rows([(-1, "pfc1", 3.0, "mufm", 0.001)]))
    assert single == {"mufm/pfc1": 3.0}
