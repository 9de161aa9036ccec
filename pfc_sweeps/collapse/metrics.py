"""Exact one-shot PFC / NC metrics on whole feature matrices (docs/metrics.md, paper eq. 7-9 /
17-19): pure functions, on the device of their inputs, in float64, never a d x d matrix (the
K x K Gram algebra of Htilde = [m_1 - g, ..., m_K - g], docs/metrics.md "Notation"). They are
built from the kernels of :mod:`pfc_sweeps.collapse.stats`, which the streaming
:class:`~pfc_sweeps.collapse.tracker.CollapseTracker` reuses chunk by chunk, so one-shot and
streaming numbers come from the same formulas (the tracker's float32 fast path:
docs/precision.md). Rounding ~ eps64 (1 + 1/PFC1) relative (Tr Sigma_W from
||h - m_y||^2 = ||u||^2 - 2 <u, Ht_y> + G_yy with u = h - g).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from pfc_sweeps.collapse.geodesic import (
    geodesic_bernstein_diag,
    geodesic_coefficients,
    geodesic_from_stats,
    geodesic_gram,
    geodesic_ncc_correct,
    geodesic_score_matrix,
)
from pfc_sweeps.collapse.inputs import (
    F64,
    DegenerateFeaturesError,
    MetricInputError,
    _check_inputs,
    _chunks,
    check_counts,
    check_features,
    check_labels,
    check_num_classes,
    one_hot64,
)
from pfc_sweeps.collapse.stats import (
    centered,
    class_moments,
    cross_within,
    layer_second_moments,
    nc_from_stats,
    ncc_scores,
    pfc_from_stats,
)
from pfc_sweeps.results.schema import PFC_METRICS


def _layer_pass1(x: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    counts = torch.bincount(labels, minlength=num_classes).to(F64)  # (K,)
    sums = torch.zeros(num_classes, x.shape[1], dtype=F64, device=x.device)
    for sl in _chunks(x.shape[0], x.shape[1], x.device):
        sums.addmm_(one_hot64(labels[sl], num_classes).T, x[sl].to(F64))
    check_counts(counts)
    return counts, sums


def _layer_stats(x: Tensor, labels: Tensor, num_classes: int) -> dict:
    counts, sums = _layer_pass1(x, labels, num_classes)
    means, g, ht, gram = class_moments(counts, sums)
    gdiag = torch.diagonal(gram)
    trw = torch.zeros((), dtype=F64, device=x.device)
    zz = torch.zeros(num_classes, num_classes, dtype=F64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for sl in _chunks(x.shape[0], x.shape[1], x.device):
        y = labels[sl]
        _, pred, trw_b, zz_b = layer_second_moments(centered(x[sl], g), y, ht, gram, gdiag)
        trw += trw_b
        zz += zz_b
        correct += (pred == y).sum()
    return {
        "means": means,
        "g": g,
        "ht": ht,
        "gram": gram,
        "trw": trw,
        "zz": zz,
        "correct": correct,
    }


def pfc_metrics(features: Tensor, labels: Tensor, num_classes: int) -> dict[str, float]:
    """PFC1-3 and NC1/NC2 of one layer, exact in float64 (no d x d matrix).

    Paper eq. 7-9 (PFC1-3); Papyan et al. (2020) NC1/NC2; docs/metrics.md.

    Args:
        features: (N, d) any float dtype/device.
        labels: (N,) integers in [0, num_classes).
        num_classes: K >= 2.

    Returns:
        Floats keyed by schema PFC1, PFC2, PFC3, TR_SW, TR_SB, NC1, NC2_EQUINORM, NC2_EQUIANGLE.

    Raises:
        MetricInputError: bad shapes, labels out of range, NaN/inf; EmptyClassError: a class
        without samples; DegenerateFeaturesError: all class means equal.
    """
    labels = _check_inputs(features, labels, num_classes)
    n = features.shape[0]
    st = _layer_stats(features, labels, num_classes)
    pfc = pfc_from_stats(n, st["trw"][None], st["gram"][None], st["correct"][None])
    nc = nc_from_stats(n, st["gram"], st["zz"])
    out = {key: float(pfc[key][0]) for key in PFC_METRICS}
    out.update({key: float(v) for key, v in nc.items()})
    return out


def ncc_predict(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Nearest-class-center prediction with the class means of (features, labels).

    Paper eq. 9 (the NCC classifier of PFC3); docs/metrics.md.

    Args:
        features, labels, num_classes: as :func:`pfc_metrics`.

    Returns:
        (N,) int64 argmin_c ||h - m_c||^2 (ties to the lowest class index).

    Raises:
        MetricInputError, EmptyClassError: as :func:`pfc_metrics`.
    """
    labels = _check_inputs(features, labels, num_classes)
    counts, sums = _layer_pass1(features, labels, num_classes)
    _, g, ht, gram = class_moments(counts, sums)
    gdiag = torch.diagonal(gram)
    preds = []
    for sl in _chunks(features.shape[0], features.shape[1], features.device):
        proj = centered(features[sl], g) @ ht.T
        preds.append(ncc_scores(proj, gdiag).argmin(dim=1))
    return torch.cat(preds)


def _as_ts(ts: Tensor | Sequence[float]) -> Tensor:
    ts = torch.as_tensor(ts, dtype=F64)
    if ts.dim() != 1 or ts.numel() == 0:
        raise MetricInputError(f"ts must be a non-empty 1-D sequence, got shape {tuple(ts.shape)}")
    if not bool(torch.isfinite(ts).all()):
        raise MetricInputError(f"ts must be finite, got {ts.tolist()}")
    return ts


def _check_pair(h0: Tensor, hl: Tensor) -> None:
    check_features(h0, "h0")
    check_features(hl, "hL")
    if h0.shape != hl.shape:
        raise MetricInputError(
            f"h0 and hL must have the same shape (N, d), got {tuple(h0.shape)} and "
            f"{tuple(hl.shape)}"
        )


def geodesic_curve(
    h0: Tensor,
    hl: Tensor,
    labels: Tensor,
    num_classes: int,
    ts: Tensor | Sequence[float],
) -> dict[str, Tensor]:
    """PFC1-3 of h(t) = (1-t) h0 + t hL at each t, exact, never building h(t).

    Paper Fig. 3 and eq. 17-19; docs/metrics.md "Geodesic-curve prediction".

    Args:
        h0, hl: (N, d) features of the first and the last layer.
        labels: (N,) integers in [0, num_classes).
        num_classes: K >= 2.
        ts: (T,) values of t (any real t; [0, 1] is the geodesic).

    Returns:
        float64 CPU tensors (T,) keyed by schema.PFC_METRICS.

    Raises:
        MetricInputError: bad shapes or labels, non-finite ts; DegenerateFeaturesError.
    """
    check_num_classes(num_classes)
    _check_pair(h0, hl)
    labels = check_labels(labels, h0.shape[0], num_classes).to(h0.device)
    ts = _as_ts(ts)
    n, d = h0.shape
    k = num_classes
    dev = h0.device
    c0, s0 = _layer_pass1(h0, labels, k)
    cl, sl_ = _layer_pass1(hl, labels, k)
    _, g0, ht0, gram0 = class_moments(c0, s0)
    _, gl, htl, graml = class_moments(cl, sl_)
    x01 = ht0 @ htl.T  # (K, K)
    coef = geodesic_coefficients(ts).to(dev)  # (T, 3)
    gdiag_t = torch.diagonal(geodesic_gram(coef, gram0, x01, graml), dim1=1, dim2=2)  # (T, K)
    smat = geodesic_score_matrix(coef, gdiag_t)  # (K, T, 4)
    bern = geodesic_bernstein_diag(gram0, x01, graml)  # (3, K)
    rhs0 = torch.cat([ht0, htl])  # (2K, d)
    rhsl = torch.cat([htl, ht0])  # (2K, d)
    gd0, gdl = torch.diagonal(gram0), torch.diagonal(graml)
    trw = torch.zeros(3, dtype=F64, device=dev)
    correct = torch.zeros(ts.numel(), dtype=torch.int64, device=dev)
    for sl in _chunks(n, 2 * d, dev):
        y = labels[sl]
        u = centered(h0[sl], g0)  # (B, d)
        v = centered(hl[sl], gl)  # (B, d)
        proj0, _, trw0, _ = layer_second_moments(u, y, rhs0, gram0, gd0)
        projl, _, trwl, _ = layer_second_moments(v, y, rhsl, graml, gdl)
        p0, c01 = proj0[:, :k], proj0[:, k:]
        pl, c10 = projl[:, :k], projl[:, k:]
        trw += torch.stack([trw0, cross_within(u, v, c01, c10, x01, y), trwl])
        correct += geodesic_ncc_correct(smat, bern, p0, c01 + c10, pl, y)
    out = geodesic_from_stats(ts, n, trw[0], trw[1], trw[2], gram0, x01, graml, correct)
    return {key: v.cpu() for key, v in out.items()}


def _check_layers(features_per_layer: Sequence[Tensor]) -> list[Tensor]:
    layers = list(features_per_layer)
    if len(layers) < 2:
        raise MetricInputError(f"need at least 2 layers (L >= 1), got {len(layers)}")
    for i, h in enumerate(layers):
        check_features(h, f"features of layer {i}")
        if h.shape != layers[0].shape:
            raise MetricInputError(
                f"all layers must have the same shape (N, d) for path lengths; layer 0 has "
                f"{tuple(layers[0].shape)}, layer {i} has {tuple(h.shape)}"
            )
    return layers


def _path_stats(layers: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-step sums of ||h^{l+1} - h^l|| and its square (L,), and of ||h^L - h^0|| (and ^2)."""
    steps = len(layers) - 1
    dev = layers[0].device
    plen = torch.zeros(steps, dtype=F64, device=dev)
    psq = torch.zeros(steps, dtype=F64, device=dev)
    disp = torch.zeros(2, dtype=F64, device=dev)
    n, d = layers[0].shape
    for sl in _chunks(n, d, dev):
        for j in range(steps):
            sq = ((layers[j + 1][sl].to(F64) - layers[j][sl].to(F64)) ** 2).sum(dim=1)
            plen[j] += sq.sqrt().sum()
            psq[j] += sq.sum()
        sq = ((layers[-1][sl].to(F64) - layers[0][sl].to(F64)) ** 2).sum(dim=1)
        disp += torch.stack([sq.sqrt().sum(), sq.sum()])
    return plen, psq, disp[0], disp[1]


def relative_positions_from_lengths(step_lengths: Tensor) -> Tensor:
    """Relative depth from the path lengths of the L steps: r_l = sum_{j<l} len_j / sum_j len_j.

    Paper section IV-A; docs/metrics.md "Depth coordinate".

    Args:
        step_lengths: (L,) float64 sum_i ||h_i^{l+1} - h_i^l|| per step.

    Returns:
        (L+1,) float64, r_0 = 0 and r_L = 1 exactly.

    Raises:
        DegenerateFeaturesError: the path has length 0.
    """
    total = step_lengths.sum()
    if not bool(total > 0):
        raise DegenerateFeaturesError(
            "the forward path has length 0 (all layers equal): relative positions are undefined"
        )
    cum = torch.cat([step_lengths.new_zeros(1), torch.cumsum(step_lengths, 0)])
    r = cum / total
    r[-1] = 1.0
    return r


def relative_positions(features_per_layer: Sequence[Tensor]) -> Tensor:
    """Relative depth r_l of layers 0..L from path lengths (no labels, no means).

    Paper section IV-A; docs/metrics.md "Depth coordinate":
    r_l = sum_{j<l} sum_i ||h_i^{j+1} - h_i^j|| / sum_{j<L} sum_i ||h_i^{j+1} - h_i^j||.

    Args:
        features_per_layer: L+1 tensors (N, d) of one shape.

    Returns:
        float64 CPU tensor (L+1,), r_0 = 0 and r_L = 1.

    Raises:
        MetricInputError: fewer than 2 layers, shapes differ, NaN/inf;
        DegenerateFeaturesError: the path has length 0.
    """
    layers = _check_layers(features_per_layer)
    plen, _, _, _ = _path_stats(layers)
    return relative_positions_from_lengths(plen).cpu()


def straightness(features_per_layer: Sequence[Tensor]) -> float:
    """How straight the forward path is: sum_i ||h_i^L - h_i^0|| / sum_i sum_l ||h_i^{l+1} - h_i^l||.

    Beyond the paper; docs/metrics.md "Beyond the paper".

    Args:
        features_per_layer: as :func:`relative_positions`.

    Returns:
        A float in (0, 1] (1: every sample moves on a straight line).

    Raises:
        MetricInputError: as :func:`relative_positions`; DegenerateFeaturesError: length 0.
    """
    layers = _check_layers(features_per_layer)
    plen, _, disp, _ = _path_stats(layers)
    total = plen.sum()
    if not bool(total > 0):
        raise DegenerateFeaturesError("the forward path has length 0: straightness is undefined")
    return float(disp / total)


def energy_ratio(features_per_layer: Sequence[Tensor]) -> float:
    """Kinetic energy of the path over that of the straight line: L sum_l sum_i
    ||h_i^{l+1} - h_i^l||^2 / sum_i ||h_i^L - h_i^0||^2.

    Beyond the paper; docs/metrics.md "Beyond the paper".

    Args:
        features_per_layer: as :func:`relative_positions`.

    Returns:
        A float >= 1 (1: equal steps along straight lines).

    Raises:
        MetricInputError: as :func:`relative_positions`; DegenerateFeaturesError: h^L == h^0.
    """
    layers = _check_layers(features_per_layer)
    _, psq, _, disp_sq = _path_stats(layers)
    if not bool(disp_sq > 0):
        raise DegenerateFeaturesError("h^L == h^0 for every sample: energy_ratio is undefined")
    return float((len(layers) - 1) * psq.sum() / disp_sq)


def _htilde_pair(h0: Tensor, hl: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    check_num_classes(num_classes)
    _check_pair(h0, hl)
    labels = check_labels(labels, h0.shape[0], num_classes).to(h0.device)
    c0, s0 = _layer_pass1(h0, labels, num_classes)
    cl, sl = _layer_pass1(hl, labels, num_classes)
    return class_moments(c0, s0)[2], class_moments(cl, sl)[2]


def thm1_inner(h0: Tensor, hl: Tensor, labels: Tensor, num_classes: int) -> float:
    """Theorem 1's assumption: sum_k <Htilde^0_k, Htilde^L_k> = trace(Htilde^0^T Htilde^L).

    Paper Theorem 1; docs/metrics.md.

    Args:
        h0, hl, labels, num_classes: as :func:`geodesic_curve`.

    Returns:
        A float.

    Raises:
        MetricInputError, EmptyClassError: as :func:`pfc_metrics`.
    """
    ht0, htl = _htilde_pair(h0, hl, labels, num_classes)
    return float((ht0 * htl).sum())


def transport_cost(h0: Tensor, hl: Tensor, labels: Tensor, num_classes: int) -> float:
    """Theorem 2's transport cost ||Htilde^L - Htilde^0||_F^2.

    Paper Theorem 2; docs/metrics.md.

    Args:
        h0, hl, labels, num_classes: as :func:`geodesic_curve`.

    Returns:
        A float >= 0.

    Raises:
        MetricInputError, EmptyClassError: as :func:`pfc_metrics`.
    """
    ht0, htl = _htilde_pair(h0, hl, labels, num_classes)
    return float(((htl - ht0) ** 2).sum())


def _check_classifier(weight: Tensor, d: int, num_classes: int, bias: Tensor | None = None):
    if not isinstance(weight, Tensor) or tuple(weight.shape) != (num_classes, d):
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise MetricInputError(
            f"classifier weight must have shape ({num_classes}, {d}), got {shape}"
        )
    if not bool(torch.isfinite(weight).all()):
        raise MetricInputError("classifier weight contains NaN or inf")
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (num_classes,):
            shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise MetricInputError(f"classifier bias must have shape ({num_classes},), got {shape}")
        if not bool(torch.isfinite(bias).all()):
            raise MetricInputError("classifier bias contains NaN or inf")


def nc3_from_stats(weight: Tensor, ht: Tensor) -> Tensor:
    """NC3 from the class means: || W^T/||W||_F - Htilde/||Htilde||_F ||_F^2.

    Papyan et al. (2020) NC3; docs/metrics.md.

    Args:
        weight: (K, d) classifier weight.
        ht: (K, d) = Htilde^T, rows m_c - g.

    Returns:
        0-d float64 tensor on ht's device.
    """
    w = weight.to(device=ht.device, dtype=F64)
    return ((w / torch.linalg.norm(w) - ht / torch.linalg.norm(ht)) ** 2).sum()


def nc3(classifier_weight: Tensor, features: Tensor, labels: Tensor, num_classes: int) -> float:
    """NC3 self-duality of the last layer: ||W^T/||W||_F - Htilde/||Htilde||_F||_F^2.

    Papyan et al. (2020) NC3; docs/metrics.md.

    Args:
        classifier_weight: (K, d); features: (N, d) features entering the classifier.
        labels, num_classes: as :func:`pfc_metrics`.

    Returns:
        A float in [0, 4].

    Raises:
        MetricInputError: bad shapes, labels, an all-zero weight; DegenerateFeaturesError.
    """
    labels = _check_inputs(features, labels, num_classes)
    _check_classifier(classifier_weight, features.shape[1], num_classes)
    counts, sums = _layer_pass1(features, labels, num_classes)
    ht = class_moments(counts, sums)[2]
    if not bool(torch.linalg.norm(ht) > 0):
        raise DegenerateFeaturesError("Htilde = 0 (all class means equal): NC3 is undefined")
    if not bool(torch.linalg.norm(classifier_weight.to(F64)) > 0):
        raise MetricInputError("classifier weight is all zeros: NC3 is undefined")
    return float(nc3_from_stats(classifier_weight, ht))


def nc4(
    classifier_weight: Tensor,
    classifier_bias: Tensor | None,
    features: Tensor,
    labels: Tensor,
    num_classes: int,
) -> float:
    """NC4: fraction of samples where argmax_c (W h + b)_c differs from the NCC argmin.

    Papyan et al. (2020) NC4; docs/metrics.md. Ties go to the lowest class index in both.

    Args:
        classifier_weight: (K, d); classifier_bias: (K,) or None (zero).
        features: (N, d) features entering the classifier.
        labels, num_classes: as :func:`pfc_metrics`.

    Returns:
        A float in [0, 1].

    Raises:
        MetricInputError: bad shapes, labels, non-finite classifier; EmptyClassError.
    """
    labels = _check_inputs(features, labels, num_classes)
    _check_classifier(classifier_weight, features.shape[1], num_classes, classifier_bias)
    ncc = ncc_predict(features, labels, num_classes)
    w = classifier_weight.to(device=features.device, dtype=F64)
    b = (
        torch.zeros(num_classes, dtype=F64, device=features.device)
        if classifier_bias is None
        else classifier_bias.to(device=features.device, dtype=F64)
    )
    disagree = 0
    for sl in _chunks(features.shape[0], features.shape[1], features.device):
        logits = torch.addmm(b, features[sl].to(F64), w.T)
        disagree += int((logits.argmax(dim=1) != ncc[sl]).sum())
    return disagree / features.shape[0]


def effective_depth(ncc_errors: Sequence[float] | Tensor, epsilon: float = 0.01) -> int:
    """Smallest layer index l with NCC error (1 - PFC3) <= epsilon.

    Paper section IV (effective depth); docs/metrics.md.

    Args:
        ncc_errors: one NCC error per layer.
        epsilon: the threshold, a finite number >= 0.

    Returns:
        The layer index, or -1 when no layer reaches epsilon (never a valid layer index;
        aggregations must treat it as "not reached within L layers").

    Raises:
        MetricInputError: empty or non-finite errors, a bad epsilon.
    """
    errs = torch.as_tensor(ncc_errors, dtype=F64).flatten()
    if errs.numel() == 0:
        raise MetricInputError("ncc_errors is empty; need one value per layer")
    if not bool(torch.isfinite(errs).all()):
        raise MetricInputError(f"ncc_errors must be finite, got {errs.tolist()}")
    if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon >= 0):
        raise MetricInputError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    hit = (errs <= epsilon).nonzero().flatten()
    return int(hit[0]) if hit.numel() else -1
