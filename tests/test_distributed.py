"""One job on several processes (issue 17): torchrun and SLURM, gloo on CPU.

Every multi-process table is compared with the same job run as one process: the metric
pass exactly (1e-9 relative on the float64 path, counts equal), DDP training to 1e-4.
The unit tests of the sharding run in-process; the others start ``python -m
torch.distributed.run --standalone`` (2 or 3 ranks) and are marked slow.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fakedata
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import HELPERS, REPO
from inprocess import run_in_process
from slurm_cluster import SLURM_LAUNCHER, require_slurm

from pfc_sweeps.data.bundles import DataBundle, ShardedData, StreamBundle, eval_shard, train_shares
from pfc_sweeps.jobs.jobdir import fingerprint
from pfc_sweeps.results.schema import (
    CHECKPOINT_FILE,
    EPOCH_METRICS,
    NC4,
    PFC3,
    RESULTS_FILE,
    TRAIN_LOSS,
    read_curves,
    read_results,
)

KEYS = ["epoch", "split", "layer", "metric"]
RUN_COLS = ["run_id", "sweep_id"]
SMALL = ["arch.width=16", "arch.blocks=3", "train.geodesic_points=5"]
TRAIN3 = [*SMALL, "train.epochs=3"]
EXACT = ["train.metric_precision=float64"]  # the tracker's exact path (docs/precision.md)
COUNTS = (PFC3, NC4)  # hit counts / N: equal exactly
MIXER = [
    "arch=module",
    "arch.model={_target_: user_model.Mixer, num_classes: null, in_channels: null}",
    "arch.layers=[conv,proj,blocks.*]",
    "arch.classifier=head",
]


# ----------------------------------------------------------------------------- helpers


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    env["PYTHONPATH"] = os.pathsep.join([str(HELPERS), env.get("PYTHONPATH", "")])
    for var in (
        "SLURM_JOB_ID",
        "WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "WANDB_DIR",
    ):  # a run's W&B files go to its job dir unless WANDB_DIR is set (CI sets it)
        env.pop(var, None)
    return {**env, **extra}


def _torchrun_cmd(nproc: int, *args: str) -> list[str]:
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*run, "--nproc_per_node", str(nproc), str(REPO / "launch.py"), *args]


def torchrun(nproc: int, *args: str, cwd: Path = REPO, timeout: float = 300):
    """``python -m torch.distributed.run --standalone --nproc_per_node N launch.py ARGS``."""
    return subprocess.run(
        _torchrun_cmd(nproc, *args),
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ok(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, p.stderr[-3000:]


def _table(out: Path) -> pd.DataFrame:
    rows, meta = read_results(out)
    assert meta["status"] == "done"
    return rows.drop(columns=RUN_COLS).sort_values(KEYS).reset_index(drop=True)


def _metrics(df: pd.DataFrame) -> pd.DataFrame:
    return df[~df.metric.isin(EPOCH_METRICS)]


def assert_same_table(a: pd.DataFrame, b: pd.DataFrame, rtol: float, counts_exact: bool) -> None:
    """Same rows; values equal to ``rtol`` relative; the count metrics exactly if asked."""
    m = a.merge(b, on=KEYS, how="outer", indicator=True, suffixes=("_a", "_b"))
    assert (m["_merge"] == "both").all(), m[m["_merge"] != "both"][KEYS]
    va, vb = m["value_a"].to_numpy(), m["value_b"].to_numpy()
    rel = np.abs(va - vb) / np.maximum(np.abs(va), 1e-300)
    worst = m.assign(rel=rel).sort_values("rel").tail(3)[[*KEYS, "value_a", "value_b", "rel"]]
    assert np.all((rel <= rtol) | (va == vb)), worst
    if counts_exact:
        c = m[m.metric.isin(COUNTS)]
        assert len(c) and (c["value_a"] == c["value_b"]).all()
    np.testing.assert_array_equal(
        m["rel_pos_a"].isna().to_numpy(), m["rel_pos_b"].isna().to_numpy()
    )


# ----------------------------------------------------------------------------- sharding (in-process)


@pytest.mark.parametrize("n", [1, 7, 100, 101, 1437])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [1, 16, 1000])
def test_eval_shards_cover_every_sample_once_in_the_single_process_batches(n, world, batch):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    parts = [eval_shard(order, batch, r, world) for r in range(world)]
    together = torch.cat(parts)
    assert sorted(together.tolist()) == list(range(n))  # none dropped, none repeated
    if n >= world:
        assert all(len(p) for p in parts)  # every rank feeds the tracker
    if len(order.split(batch)) >= world:  # each rank's batches are the single process's
        single = {tuple(c.tolist()) for c in order.split(batch)}
        mine = {tuple(c.tolist()) for p in parts for c in p.split(batch)}
        assert mine == single


@pytest.mark.parametrize("world", [2, 3])
def test_train_shares_make_up_each_global_batch(world):
    order = torch.randperm(101, generator=torch.Generator().manual_seed(0))
    shares = [train_shares(order, 16, r, world) for r in range(world)]
    for i, g in enumerate(order.split(16)):
        got = torch.cat([shares[r][i] for r in range(world)])
        assert torch.equal(got, g)  # the global batch, in order
        sizes = [len(shares[r][i]) for r in range(world)]
        assert max(sizes) - min(sizes) <= 1


class _Recording(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n, self.seen = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.seen.append(i)
        return torch.full((2,), float(i)), i % 3


@pytest.mark.parametrize("world", [2, 3])
def test_streamed_shards_read_every_item_once(world):
    ds = _Recording(23)  # not divisible by 2 or 3
    stream = StreamBundle(ds, ds, 3, (2,), "module", torch.device("cpu"))
    xs = []
    for r in range(world):
        for x, y in ShardedData(stream, r, world).batches("train", torch.arange(23), 4):
            xs.append(x[:, 0])
            assert torch.equal(y, x[:, 0].long() % 3)
    assert sorted(ds.seen) == list(range(23))
    assert sorted(torch.cat(xs).long().tolist()) == list(range(23))
    mem = DataBundle(
        torch.arange(23.0)[:, None], torch.arange(23) % 3, *[torch.zeros(0)] * 2, 3, (1,), "m"
    )
    assert ShardedData(mem, 1, world).size("train") == 23  # the split's size, not the shard's


def test_fingerprint_leaves_out_how_many_processes_run_the_job():
    cfg = {"train": {"epochs": 3, "distributed": "off", "sync_bn": False, "dist_timeout_s": 9.0}}
    other = {"train": {"epochs": 3, "distributed": "auto", "sync_bn": True, "dist_timeout_s": 1.0}}
    assert fingerprint(cfg) == fingerprint(other) == {"train.epochs": 3}


# ----------------------------------------------------------------------------- torchrun (slow)


@pytest.fixture(scope="module")
def single_job(tmp_path_factory):
    """A 3-epoch digits training run in one process."""
    out = tmp_path_factory.mktemp("single") / "job"
    run_in_process(out, *TRAIN3, "logger=none")
    return out


@pytest.fixture(scope="module")
def two_rank_job(tmp_path_factory):
    """The same run on 2 ranks, with the default job dir and an offline W&B run."""
    cwd = tmp_path_factory.mktemp("two")
    p = torchrun(2, *TRAIN3, "logger=wandb", cwd=cwd)
    _ok(p)
    said = p.stdout + p.stderr  # rank 0 alone logs and prints
    assert said.count("epoch 1/3") == 1 and said.count("Results:") == 1, said[-3000:]
    dirs = [p.parent for p in (cwd / "outputs").glob("*/*/" + RESULTS_FILE)]
    assert len(list((cwd / "outputs").glob("*/*"))) == 1 and len(dirs) == 1  # one job dir
    return dirs[0]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_measure_under_torchrun_equals_one_process(single_job, tmp_path, nproc):
    ckpt = single_job / CHECKPOINT_FILE
    args = ["task=measure", f"arch.checkpoint={ckpt}", *SMALL, "logger=none", *EXACT]
    args += ["train.eval_batch_size=100"]  # 15 batches, dealt to the ranks in turn
    run_in_process(tmp_path / "one", *args)
    _ok(torchrun(nproc, *args, f"hydra.run.dir={tmp_path / 'many'}"))
    a, b = _table(tmp_path / "one"), _table(tmp_path / "many")
    assert_same_table(a, b, rtol=1e-9, counts_exact=True)
    ca, cb = read_curves(tmp_path / "one"), read_curves(tmp_path / "many")
    np.testing.assert_allclose(cb["value"], ca["value"], rtol=1e-9, atol=0)


@pytest.mark.slow
def test_own_model_and_streamed_module_data_under_torchrun(tmp_path):
    root = tmp_path / "folder"
    fakedata.write_image_folder(root, k=5, n_per_class=23)  # 115 train, 20 test images
    node = "{_target_: torchvision.datasets.ImageFolder, root: %s, transform: {_target_: torchvision.transforms.ToTensor}}"
    data = ["dataset=module", f"dataset.train={node % (root / 'train')}"]
    data += [f"dataset.test={node % (root / 'test')}", "train.data_gb=0"]  # streamed
    common = [*data, *MIXER, "logger=none", "train.geodesic_points=5", "train.eval_batch_size=16"]
    run_in_process(tmp_path / "train", *common, "train.epochs=1", "train.batch_size=16")
    ckpt = tmp_path / "train" / CHECKPOINT_FILE
    args = [*common, "task=measure", f"arch.checkpoint={ckpt}", *EXACT]
    run_in_process(tmp_path / "one", *args)
    _ok(torchrun(2, *args, f"hydra.run.dir={tmp_path / 'two'}"))
    assert_same_table(_table(tmp_path / "one"), _table(tmp_path / "two"), 1e-9, True)


@pytest.mark.slow
def test_ddp_training_equals_one_process(single_job, two_rank_job):
    a, b = _table(single_job), _table(two_rank_job)
    last = a.epoch.max()
    assert_same_table(_metrics(a[a.epoch == last]), _metrics(b[b.epoch == last]), 1e-4, False)
    loss_a = a[a.metric == TRAIN_LOSS].set_index("epoch")["value"]
    loss_b = b[b.metric == TRAIN_LOSS].set_index("epoch")["value"]
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-4)
    assert len(loss_a) == 3
    files = [p.name for p in two_rank_job.rglob("*") if p.is_file()]
    assert files.count(RESULTS_FILE) == 1 and files.count(CHECKPOINT_FILE) == 1
    runs = list((two_rank_job / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs


@pytest.mark.slow
def test_surrogate_job_runs_on_rank_0_alone(tmp_path):
    args = ["task=mufm", "surrogate.steps=50", "logger=none"]
    run_in_process(tmp_path / "one", *args)
    _ok(torchrun(2, *args, f"hydra.run.dir={tmp_path / 'two'}"))
    pd.testing.assert_frame_equal(_table(tmp_path / "two"), _table(tmp_path / "one"))
    assert not list(tmp_path.glob("two/**/wandb"))


# ----------------------------------------------------------------------------- faults (slow)


def _children(pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (their RANK variable)."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            for kv in env:
                if kv.startswith(b"RANK="):
                    out[int(kv[5:])] = int(proc.name)
    return out


def _start(out: Path, *extra: str, epochs: int = 3) -> subprocess.Popen:
    args = [*SMALL, f"train.epochs={epochs}", "logger=none", f"hydra.run.dir={out}", *extra]
    cmd = _torchrun_cmd(2, *args)
    return subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_checkpoint(p: subprocess.Popen, out: Path, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while not (out / CHECKPOINT_FILE).exists():
        assert p.poll() is None, p.communicate()[1][-2000:]
        assert time.monotonic() - t0 < timeout
        time.sleep(0.02)


@pytest.mark.slow
def test_killed_torchrun_resumes_and_a_second_job_is_refused(two_rank_job, tmp_path):
    out = tmp_path / "job"
    p = _start(out)
    try:
        _wait_for_checkpoint(p, out)
        ranks = _children(p.pid)
        for pid in ranks.values():
            os.kill(pid, signal.SIGSTOP)  # the job keeps its dir while the second one tries
        second = torchrun(2, *TRAIN3, "logger=none", f"hydra.run.dir={out}", timeout=120)
        assert second.returncode != 0
        assert "in use by another job" in second.stderr
        assert [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
        p.kill()  # SIGKILL of the torchrun parent: its ranks die with it
        p.wait(timeout=30)
        for pid in ranks.values():
            _wait_gone(pid)
    finally:
        p.kill()
        p.communicate()
    assert not (out / "done").exists()
    _ok(torchrun(2, *TRAIN3, "logger=none", f"hydra.run.dir={out}"))
    pd.testing.assert_frame_equal(_table(out), _table(two_rank_job))


def _wait_gone(pid: int, timeout: float = 30) -> None:
    t0 = time.monotonic()
    while Path(f"/proc/{pid}").exists():
        stat = Path(f"/proc/{pid}/stat")
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return  # a zombie: dead, not yet reaped
        except OSError:
            return
        assert time.monotonic() - t0 < timeout, f"rank pid {pid} outlived torchrun"
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_rank_fails_the_job_and_the_rerun_resumes(two_rank_job, tmp_path):
    out = tmp_path / "job"
    p = _start(out)
    try:
        _wait_for_checkpoint(p, out)
        os.kill(_children(p.pid)[1], signal.SIGKILL)
        _, err = p.communicate(timeout=120)  # torchrun stops rank 0: nothing waits
    finally:
        p.kill()
    assert p.returncode != 0, err[-2000:]
    assert not (out / "done").exists()
    _ok(torchrun(2, *TRAIN3, "logger=none", f"hydra.run.dir={out}"))
    pd.testing.assert_frame_equal(_table(out), _table(two_rank_job))


@pytest.mark.slow
def test_a_hung_rank_fails_the_job_after_the_timeout_with_one_line(tmp_path):
    out = tmp_path / "job"
    p = _start(out, "train.dist_timeout_s=5", epochs=30)
    try:
        _wait_for_checkpoint(p, out)
        os.kill(_children(p.pid)[1], signal.SIGSTOP)
        _, err = p.communicate(timeout=150)
    finally:
        p.kill()
        p.communicate()
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert errors and "rank 0 of 2: rank 1 stopped answering" in errors[0], err[-3000:]
    assert "dist_timeout_s=5" in errors[0] and len(errors) == 1
    assert p.returncode != 0


# ----------------------------------------------------------------------------- SLURM (slow)


@pytest.mark.slow
@pytest.mark.slurm
def test_two_task_slurm_job_equals_the_torchrun_run(two_rank_job, tmp_path):
    require_slurm()
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "launch.py"), "-m", *SLURM_LAUNCHER]
    cmd += ["hydra.launcher.tasks_per_node=2", *TRAIN3, "logger=none", f"hydra.sweep.dir={sweep}"]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    _ok(p)
    jobs = [d for d in sweep.iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert [d.name for d in jobs] == ["0"]  # both tasks wrote into one job dir
    logs = sorted(p.name for p in sweep.glob(".submitit/*/*_log.out"))
    assert len(logs) == 2  # two tasks ran
    b, a = _table(sweep / "0"), _table(two_rank_job)
    assert_same_table(a, b, rtol=1e-4, counts_exact=False)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.distributed=maybe", "train.distributed"),
        ("train.dist_timeout_s=0", "train.dist_timeout_s"),
        ("train.metric_precision=float32", "train.metric_precision"),
    ],
)
def test_bad_distributed_keys_are_one_line_naming_the_key(override, key):
    from hydra import compose, initialize_config_dir

    from pfc_sweeps.config import ConfigError, validate

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[override])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert key in str(e.value) and "\n" not in str(e.value)
