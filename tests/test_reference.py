"""The float64 reference (tests/helpers/reference.py) is as robust as the code it checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.reference import layer_metrics, pinv_rank, scatter

from pfc_sweeps.collapse.metrics import pfc_metrics
from pfc_sweeps.results.schema import NC1, PFC1, PFC2, PFC3


def _ill_conditioned(seed: int = 1, num_classes: int = 5, d: int = 48, n: int = 500):
    """Class means mostly in a 2-dim subspace: Sigma_B's nonzero eigenvalues span 5 decades."""
    gen = np.random.default_rng(seed)
    y = np.arange(n) % num_classes
    mu = gen.normal(size=(num_classes, 2)) @ gen.normal(size=(2, d))
    mu += 1e-3 * gen.normal(size=(num_classes, d))
    return mu[y] + 0.05 * gen.normal(size=(n, d)), y


def test_reference_agrees_with_the_engine_on_an_ill_conditioned_layer():
    h, y = _ill_conditioned()
    s = np.linalg.svd(scatter(h, y, 5)[1], compute_uv=False)
    assert s[3] / s[0] < 1e-4  # the layer is ill-conditioned as intended
    want = layer_metrics(h, y, 5)
    got = pfc_metrics(torch.tensor(h), torch.tensor(y), 5)
    for key in (PFC1, PFC2, PFC3, NC1):
        assert got[key] == pytest.approx(want[key], rel=1e-8), key


def test_rank_cut_ignores_rounding_noise_in_the_null_directions():
    """Another BLAS rounds Sigma_B differently: noise of 1e-14 relative in its d - K + 1 null
    directions. The rank-K-1 cut gives the same NC1; numpy's default pinv cut (1e-15) inverts
    the noise and is off by orders of magnitude (what failed on Python 3.13, issue 20)."""
    h, y = _ill_conditioned()
    k = 5
    sw, sb = scatter(h, y, k)
    u, s, _ = np.linalg.svd(sb)
    null = u[:, k - 1 :]
    noise = null @ np.diag(np.linspace(0.5, 1.0, null.shape[1]) * 1e-14 * s[0]) @ null.T
    clean = np.trace(sw @ pinv_rank(sb, k - 1)) / k
    assert np.trace(sw @ pinv_rank(sb + noise, k - 1)) / k == pytest.approx(clean, rel=1e-9)
    assert np.trace(sw @ np.linalg.pinv(sb + noise)) / k > 1e3 * clean


def test_pinv_rank_is_the_moore_penrose_inverse_on_a_rank_deficient_matrix():
    gen = np.random.default_rng(3)
    a = gen.normal(size=(6, 3))
    m = a @ a.T  # rank 3
    p = pinv_rank(m, 3)
    np.testing.assert_allclose(m @ p @ m, m, atol=1e-12)
    np.testing.assert_allclose(p @ m @ p, p, atol=1e-12)
    np.testing.assert_allclose(p, np.linalg.pinv(m, rcond=1e-10), atol=1e-12)
