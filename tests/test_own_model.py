"""Your own model and data set (issue 10): arch=module, task=measure, dataset=module, streaming.

The user model lives in ``tests/helpers/user_model.py``, outside the package, and is reached only
through ``arch.model._target_``. Its metrics are checked against a float64 brute force on
features taken by hand with forward hooks.
"""

from __future__ import annotations

import math

import fakedata
import numpy as np
import pandas as pd
import pytest
import torch
from helpers.reference import layer_metrics, ncc_predict
from inprocess import run_in_process
from user_model import Mixer

from pfc_sweeps.data.builtin import load_dataset
from pfc_sweeps.results.schema import (
    CHECKPOINT_FILE,
    EPOCH_METRICS,
    GEODESIC_ERR_METRICS,
    NC1,
    NC3,
    NC4,
    PFC1,
    PFC2,
    PFC3,
    PFC_METRICS,
    TR_SB,
    TR_SW,
    read_curves,
    read_results,
)

MIXER = [
    "arch=module",
    "arch.model={_target_: user_model.Mixer, num_classes: null, in_channels: null}",
    "arch.layers=[conv,proj,blocks.*]",
    "arch.classifier=head",
]
FAST = ["logger=none", "train.geodesic_points=5", "optim.lr=0.05"]
RUN_COLS = ["run_id", "sweep_id"]  # differ between two jobs by design


def _hand_features(model: Mixer, x: torch.Tensor) -> tuple[list[np.ndarray], np.ndarray]:
    """Layer 0 = input of conv, then the outputs of conv, proj, blocks.0-2; plus head's input."""
    feats: list[torch.Tensor] = []
    head_in: list[torch.Tensor] = []
    hooks = [model.conv.register_forward_pre_hook(lambda _m, a: feats.append(a[0]))]
    for m in [model.conv, model.proj, *model.blocks]:
        hooks.append(m.register_forward_hook(lambda _m, _a, out: feats.append(out)))
    hooks.append(model.head.register_forward_pre_hook(lambda _m, a: head_in.append(a[0])))
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return [f.flatten(1).double().numpy() for f in feats], head_in[0].double().numpy()


@pytest.fixture(scope="module")
def mixer_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixer") / "job"
    run_in_process(out, *MIXER, *FAST, "train.epochs=3")
    return out


def test_user_model_metrics_equal_brute_force_on_hooked_features(mixer_job):
    df, meta = read_results(mixer_job)
    assert meta["status"] == "done" and set(df["arch"]) == {"module"}
    last = df[df.epoch == 3]
    state = torch.load(mixer_job / CHECKPOINT_FILE, weights_only=False)["model"]
    model = Mixer(num_classes=10)
    model.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})
    data = load_dataset("digits", seed=0)
    feats, head_in = _hand_features(model, data.train_x)
    y = data.train_y.numpy()
    assert len(feats) == 6
    for layer, h in enumerate(feats):
        ref = layer_metrics(h, y, 10)
        got = last[last.layer == layer].set_index("metric")["value"]
        # float32 features take the tracker's fast path: 1e-5 relative (docs/precision.md)
        for m in (PFC1, PFC2, NC1, TR_SW, TR_SB):
            assert got[m] == pytest.approx(ref[m], rel=1e-5), (layer, m)
        assert got[PFC3] == ref[PFC3], layer  # counts: exact (no near-ties here)
    # layers 0 (64) and 1 (4x8x8) precede the trailing run of width-32 layers 2..5
    rel = last[last.metric == PFC1].set_index("layer")["rel_pos"]
    assert rel[[0, 1]].isna().all() and rel[2] == 0 and rel[5] == 1
    assert np.all(np.diff(rel[[2, 3, 4, 5]].to_numpy()) > 0)
    # NC4 on the classifier's input (not blocks.2's output): argmax W h + b vs NCC of h
    w, b = (p.detach().double().numpy() for p in (model.head.weight, model.head.bias))
    nc4 = np.mean((head_in @ w.T + b).argmax(1) != ncc_predict(head_in, y, 10))
    got_nc4 = last[(last.metric == NC4)]
    assert list(got_nc4.layer) == [5] and got_nc4.value.iloc[0] == pytest.approx(nc4, abs=1e-12)
    # path quantities only over the run; the curves exist
    assert set(last.loc[last.layer.isin([0, 1]), "metric"]).isdisjoint({GEODESIC_ERR_METRICS[0]})
    curves = read_curves(mixer_job)
    assert ((curves.epoch == 3) & (curves.metric == PFC2)).sum() == 5


def _metric_rows(df: pd.DataFrame, epoch: int) -> pd.DataFrame:
    cols = ["layer", "metric", "rel_pos", "value"]
    rows = df[(df.epoch == epoch) & ~df.metric.isin(EPOCH_METRICS)]
    return rows[cols].sort_values([*cols[:2], "rel_pos"]).reset_index(drop=True)


def test_measure_own_checkpoint_equals_last_epoch(mixer_job, tmp_path):
    out = tmp_path / "measure"
    ckpt = mixer_job / CHECKPOINT_FILE
    run_in_process(out, *MIXER, *FAST, "task=measure", f"arch.checkpoint={ckpt}")
    got, meta = read_results(out)
    want, _ = read_results(mixer_job)
    assert meta["status"] == "done" and set(got.epoch) == {3} and set(got.split) == {"train"}
    a, b = _metric_rows(got, 3), _metric_rows(want, 3)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=0, atol=1e-12)
    assert set(a.metric) >= {*PFC_METRICS, NC1, NC3, NC4}
    ca, cb = (read_curves(d).drop(columns=RUN_COLS) for d in (out, mixer_job))
    cb = cb[cb.epoch == 3].reset_index(drop=True)
    assert len(ca) == 15
    pd.testing.assert_frame_equal(
        ca.drop(columns="task"), cb.drop(columns="task"), check_exact=False, rtol=0, atol=1e-12
    )


def test_measure_builtin_digits_checkpoint_and_plain_state_dict(tmp_path):
    job = tmp_path / "digits"
    run_in_process(job, *FAST, "train.epochs=2", "arch.blocks=3", "arch.width=16")
    want, _ = read_results(job)
    ckpt = job / CHECKPOINT_FILE
    out = tmp_path / "measure"
    extra = ["arch.blocks=3", "arch.width=16", "task=measure"]
    run_in_process(out, *FAST, *extra, f"arch.checkpoint={ckpt}")
    got, _ = read_results(out)
    pd.testing.assert_frame_equal(_metric_rows(got, 2), _metric_rows(want, 2), rtol=0, atol=1e-12)
    # a plain state_dict: epoch 0, same numbers; on the test split, other numbers
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(ckpt, weights_only=False)["model"], plain)
    out2 = tmp_path / "measure_test"
    run_in_process(out2, *FAST, *extra, f"arch.checkpoint={plain}", "measure.split=test")
    test_rows, _ = read_results(out2)
    assert set(test_rows.epoch) == {0} and set(test_rows.split) == {"test"}
    assert len(_metric_rows(test_rows, 0)) == len(_metric_rows(want, 2))


def test_resnet18_on_cifar10_files(tmp_path, no_md5):
    root = tmp_path / "data"
    fakedata.write("cifar10", root, n_per_class=2)
    out = tmp_path / "job"
    run_in_process(
        out,
        "dataset=cifar10",
        "arch=resnet18",
        f"dataset.root={root}",
        "dataset.download=false",
        "train.epochs=1",
        *FAST,
    )
    df, meta = read_results(out)
    assert meta["status"] == "done" and set(df.arch) == {"resnet18"}
    pfc = df[df.metric == PFC1].set_index("layer")["rel_pos"]
    # layer 0 = layer3's output (256x8x8), layers 1-2 = layer4.0, layer4.1 (512x4x4)
    assert list(pfc.index) == [0, 1, 2] and math.isnan(pfc[0]) and list(pfc[[1, 2]]) == [0, 1]
    assert (read_curves(out).metric == PFC1).sum() == 5
    assert df[df.metric.isin([NC3, NC4])].layer.tolist() == [2, 2]


def _folder_data(root) -> list[str]:
    """dataset=module: ImageFolder train/test sets under ``root`` with ToTensor."""
    node = "{_target_: torchvision.datasets.ImageFolder, root: %s, transform: {_target_: torchvision.transforms.ToTensor}}"
    return [
        "dataset=module",
        f"dataset.train={node % (root / 'train')}",
        f"dataset.test={node % (root / 'test')}",
    ]


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    fakedata.write_image_folder(root, k=5, n_per_class=110)
    return root


def _frame(out) -> pd.DataFrame:
    """Both tables of a job, without the ids that differ between jobs by design."""
    rows = read_results(out)[0].drop(columns=RUN_COLS)
    return pd.concat([rows, read_curves(out).drop(columns=RUN_COLS)], ignore_index=True)


def test_streaming_equals_in_memory_on_a_500_sample_subset(folder_root, tmp_path):
    args = [*_folder_data(folder_root), "dataset.subset_per_class=100", *MIXER, *FAST]
    args += ["train.epochs=2", "train.batch_size=64", "train.eval_batch_size=128"]
    mem, stream = tmp_path / "mem", tmp_path / "stream"
    run_in_process(mem, *args)
    run_in_process(stream, *args, "train.data_gb=0")
    a, b = _frame(mem), _frame(stream)
    assert len(a[(a.metric == PFC1) & (a.epoch == 2) & a.t.isna()]) == 6
    assert set(a.dataset) == {"module"}
    pd.testing.assert_frame_equal(a, b, check_exact=True)  # exactly the same rows


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("arch.model={_target_: no_such_module.Net}", "arch.model._target_='no_such_module.Net'"),
        ("arch.layers=[conv,blocks.7]", "arch.layers: no module 'blocks.7'"),
        ("arch.layers=[conv,prj]", "nearest: proj"),
        ("arch.classifier=conv", "arch.classifier='conv' is a Sequential"),
        ("dataset.train={_target_: nope.Data}", "dataset.train._target_='nope.Data'"),
    ],
)
def test_bad_module_input_is_one_line(tmp_path, capsys, override, needle):
    out = tmp_path / "bad"
    args = [*MIXER, *FAST, "train.epochs=1"]
    if override.startswith("dataset"):
        args = ["dataset=module", "dataset.test={_target_: nope.Data}", *args]
    with pytest.raises(SystemExit) as exc:
        run_in_process(out, *args, override)
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (out / "metrics.parquet").exists() and not (out / CHECKPOINT_FILE).exists()


def test_checkpoint_not_matching_the_model_is_one_line(mixer_job, tmp_path, capsys):
    out = tmp_path / "bad"
    ckpt = mixer_job / CHECKPOINT_FILE
    with pytest.raises(SystemExit) as exc:
        run_in_process(out, *FAST, "task=measure", f"arch.checkpoint={ckpt}")
    err = capsys.readouterr().err.strip()
    assert exc.value.code != 0 and len(err.splitlines()) == 1, err
    assert f"arch.checkpoint='{ckpt}' does not match the model" in err
    assert not (out / "metrics.parquet").exists()


@pytest.mark.slow
def test_streaming_killed_and_resumed_equals_in_memory(folder_root, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import HELPERS, REPO, launch

    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(HELPERS)])}
    args = [*_folder_data(folder_root), "dataset.subset_per_class=100", *MIXER, *FAST]
    args += ["train.epochs=10", "train.batch_size=64", "train.eval_batch_size=128"]
    ref = tmp_path / "mem"
    p = launch(*args, f"hydra.run.dir={ref}", env=env)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "stream"
    stream = [*args, "train.data_gb=0", f"hydra.run.dir={out}"]
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "launch.py"), *stream],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt, deadline = out / CHECKPOINT_FILE, time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["epoch"] >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(ckpt, weights_only=False)["epoch"] < 10
    p = launch(*stream, env=env)
    assert p.returncode == 0 and "Resuming" in p.stdout, p.stderr
    pd.testing.assert_frame_equal(_frame(ref), _frame(out), check_exact=True)
