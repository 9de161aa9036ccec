"""Trustworthy result tables: one job dir, one config, one process; every failure one line.

The acceptance tests of the issue, numbered as there, plus unit tests of the pieces
(:mod:`pfc_sweeps.jobs.jobdir`, the unknown-key and inf/NaN checks of :mod:`pfc_sweeps.config`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REPO, launch
from hydra import compose, initialize_config_dir

from pfc_sweeps.config import (
    Config,
    ConfigError,
    register_configs,
    schema_keys,
    validate,
)
from pfc_sweeps.jobs.cli import check_override_keys
from pfc_sweeps.jobs.jobdir import (
    JobDirError,
    JobLock,
    check_fingerprint,
    check_usable_dir,
    fingerprint,
    remove_stale_temps,
)
from pfc_sweeps.results.schema import (
    CHECKPOINT_FILE,
    DONE_FILE,
    ERROR_FILE,
    FINGERPRINT_FILE,
    RESULTS_FILE,
    empty_frame,
    read_results,
    write_table,
)

register_configs()
TINY = ["logger=none", "arch.width=16", "arch.blocks=2", "train.geodesic_points=3"]
SURROGATE = ["task=mufm", "surrogate.steps=40", "surrogate.log_every=20"]
IDS = ["run_id", "sweep_id"]


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def _snapshot(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (relative path -> bytes)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _frame(job_dir: Path) -> pd.DataFrame:
    df, _ = read_results(job_dir)
    df = df.drop(columns=IDS)
    return df.sort_values(["epoch", "metric", "layer", "rel_pos"]).reset_index(drop=True)


def _leftovers(root: Path) -> list[Path]:
    """Results, checkpoints, W&B runs and ids anywhere under ``root``."""
    pats = [RESULTS_FILE, CHECKPOINT_FILE, "offline-run-*", "run-*", "run_id", FINGERPRINT_FILE]
    return [p for pat in pats for p in root.rglob(pat)]


# ------------------------------------------------------------------------------ units
def test_fingerprint_names_every_differing_key_and_ignores_excluded_ones(tmp_path):
    base = {"train": {"epochs": 4, "device": "cpu", "cache_gb": 1.0}, "seed": 0, "logger": {}}
    fp = fingerprint(base)
    assert fp == {"train.epochs": 4, "seed": 0}
    (tmp_path / FINGERPRINT_FILE).write_text('{"train.epochs": 4, "seed": 0}')
    moved = {**base, "train": {"epochs": 4, "device": "cuda", "cache_gb": 8.0}}
    check_fingerprint(tmp_path, fingerprint(moved))  # device and cache size may change
    changed = {**base, "train": {"epochs": 6}, "seed": 1}
    with pytest.raises(JobDirError) as e:
        check_fingerprint(tmp_path, fingerprint(changed))
    msg = str(e.value)
    assert f"{tmp_path} was started with seed=0, train.epochs=4, this run has seed=1, " in msg
    assert "train.epochs=6; use a new hydra.run.dir" in msg and "\n" not in msg


def test_lock_is_exclusive_names_the_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pfc_sweeps.jobs.jobdir import JobLock; "
         f"JobLock({str(tmp_path)!r}).acquire().claim(); print('locked', flush=True); "
         "time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(JobDirError, match=rf"{tmp_path} is in use .*pid {holder.pid}\)"):
            JobLock(tmp_path).acquire()
        holder.send_signal(signal.SIGKILL)  # the kernel frees the lock of a dead process
        holder.wait()
        stale = (tmp_path / ".lock").read_bytes()
        with JobLock(tmp_path):
            with pytest.raises(JobDirError):  # also exclusive within one process
                JobLock(tmp_path).acquire()
        assert (tmp_path / ".lock").read_bytes() == stale  # taken and released, untouched
        with JobLock(tmp_path) as lock:
            lock.claim()
        assert not list(tmp_path.iterdir())  # a claimed lock file goes with its job
    finally:
        holder.kill()
        holder.wait()


def test_usable_dir_and_stale_temporaries(tmp_path):
    (tmp_path / "f").write_text("x")
    for bad in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(JobDirError, match=str(tmp_path / "f")):
            check_usable_dir(bad)
    check_usable_dir(tmp_path / "new" / "dir")
    keep = [tmp_path / "metrics.parquet", tmp_path / "x.tmp"]
    stale = [tmp_path / ".metrics.parquet.ab12cd.tmp", tmp_path / ".checkpoint.pt.zz9.tmp"]
    for p in keep + stale:
        p.write_bytes(b"")
    assert sorted(remove_stale_temps(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted([tmp_path / "f", *keep])


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_results_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        write_table(tmp_path / RESULTS_FILE, empty_frame())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / RESULTS_FILE).stat().st_mode) == 0o666 & ~mask


@pytest.mark.parametrize(
    ("overrides", "hint"),
    [
        (["+train.epoch=5"], "train.epoch is not a config key; did you mean train.epochs?"),
        (["+optim.wd=0.1"], "optim.wd is not a config key"),
        (["+gaussian.sigmaa=2"], "did you mean gaussian.sigma?"),
        (["+surrogate.num_classes=3"], "surrogate.num_classes is not a config key"),
    ],
)
def test_unknown_keys_are_errors_with_the_nearest_key(overrides, hint):
    with pytest.raises(ConfigError, match=hint.replace("?", r"\?")):
        validate(_compose(*overrides))
    with pytest.raises(ConfigError, match=hint.replace("?", r"\?")):
        check_override_keys([o.lstrip("+") for o in overrides], GROUPS)


GROUPS = {"dataset": ["digits", "mnist"], "task": ["train"], "experiment": ["paper_fig4"]}


def test_command_line_check_leaves_groups_hydra_and_known_keys_alone():
    check_override_keys(
        ["dataset=mnist", "hydra.run.dir=x", "hydra/launcher=local", "seed=1,2", "~seed",
         "train.epochs=3", "+experiment=paper_fig4", "optim.lr=1e-3"], GROUPS,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dataset=nosuch", "dataset=nosuch is not an option of the dataset group; available: digits, mnist"),
        ("seed=x", "seed='x' is invalid"),
        ("lam.lam=abc", "lam.lam='abc' is invalid"),
        ("train.epochs=2.5", "train.epochs=2.5 is invalid"),
    ],
)  # fmt: skip
def test_command_line_check_bad_options_and_types_are_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        check_override_keys([override], GROUPS)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def _float_keys() -> list[str]:
    """Every float (and float-list) key of the schema, found from the dataclasses."""
    out = []
    for group in dataclasses.fields(Config):
        node = getattr(Config(), group.name)
        if not dataclasses.is_dataclass(node):
            continue
        for f in dataclasses.fields(node):
            if f.type in ("float", "list[float]"):
                out.append(f"{group.name}.{f.name}")
    return out


def test_float_keys_are_all_found():
    assert len(_float_keys()) >= 10 and "train.cache_gb" in _float_keys()
    assert set(_float_keys()) <= set(schema_keys())


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_every_float_key_rejects_inf_and_nan(key, bad):
    value = f"[{bad}]" if key in ("optim.decay_at", "lam.grid") else str(bad)
    with pytest.raises(ConfigError) as e:
        validate(_compose(f"{key}={value}"))
    assert str(e.value).startswith(key)


# ------------------------------------------------------------------ acceptance (launch.py)
BAD = [
    ("+train.epoch=5", "train.epochs"),
    ("train.cache_gb=inf", "train.cache_gb"),
    ("optim.weight_decay=inf", "optim.weight_decay"),
    ("optim.momentum=nan", "optim.momentum"),
    ("dataset.subset_per_class=100000", "dataset.subset_per_class"),
    pytest.param(
        "train.device=cuda", "train.device",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA"),
    ),
]  # fmt: skip


@pytest.mark.parametrize(("override", "key"), BAD)
def test_acceptance3_bad_values_are_one_line_and_leave_nothing(tmp_path, override, key):
    out = tmp_path / "job"
    p = launch("train.epochs=2", override, f"hydra.run.dir={out}", "logger=wandb",
               unset=("WANDB_DIR",), timeout=300)  # fmt: skip
    assert p.returncode != 0
    lines = _lines(p.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], p.stderr
    assert not _leftovers(tmp_path), _leftovers(tmp_path)


def test_acceptance4_garbage_checkpoint_is_one_line_naming_it(tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    (out / CHECKPOINT_FILE).write_bytes(os.urandom(4096))
    p = launch(*TINY, "train.epochs=2", f"hydra.run.dir={out}", timeout=300)
    assert p.returncode != 0
    lines = _lines(p.stderr)
    assert len(lines) == 1 and str(out / CHECKPOINT_FILE) in lines[0], p.stderr
    assert "Traceback" not in p.stderr and "delete it" in lines[0]


@pytest.mark.parametrize("launcher", ["basic", "submitit_local"])
def test_acceptance5_a_sweep_names_every_failed_job(tmp_path, launcher):
    empty, sweep = tmp_path / "empty", tmp_path / "s"
    empty.mkdir()
    p = launch("-m", "dataset=mnist,cifar100", f"dataset.root={empty}", "dataset.download=false",
               f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep}", "train.epochs=1",
               unset=("WANDB_DIR",), timeout=300)  # fmt: skip
    assert p.returncode != 0
    report = p.stderr[p.stderr.index("job(s) of the sweep failed") :]
    for job, folder in [("0", "MNIST/raw"), ("1", "cifar-100-python")]:
        assert f"{sweep / job}: " in report and str(empty / folder) in report, p.stderr
        assert str(empty / folder) in (sweep / job / ERROR_FILE).read_text()
    assert "Traceback" not in p.stderr
    assert not _leftovers(sweep), _leftovers(sweep)


def test_resumed_sweep_with_reordered_overrides_mixes_nothing(tmp_path):
    sweep = tmp_path / "s"
    p = launch("-m", *SURROGATE, "logger=none", "lam.lam=0.001,0.002", f"hydra.sweep.dir={sweep}")
    assert p.returncode == 0, p.stderr
    before = {j: _snapshot(sweep / j) for j in ("0", "1")}
    p = launch("-m", *SURROGATE, "logger=none", "lam.lam=0.002,0.001", f"hydra.sweep.dir={sweep}")
    assert p.returncode != 0
    # the sweep dir records its sweep: another order numbers the jobs differently (issue 21)
    assert _lines(p.stderr) == [
        f"error: {sweep} holds another sweep: lam.lam=0.001,0.002 (this sweep: "
        "lam.lam=0.002,0.001); the order of the values numbers the jobs; rerun the sweep "
        "recorded in sweep.json to resume it, or use a new hydra.sweep.dir"
    ], p.stderr
    for j in ("0", "1"):
        assert _snapshot(sweep / j) == before[j]


def test_acceptance6_results_are_readable_by_others_under_umask_022(tmp_path):
    out = tmp_path / "job"
    p = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *SURROGATE, "logger=none",
         f"hydra.run.dir={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: os.umask(0o022),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    for name in (RESULTS_FILE, DONE_FILE, FINGERPRINT_FILE):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


def test_run_dir_that_is_a_file_is_one_line(tmp_path):
    f = tmp_path / "f"
    f.write_text("mine")
    for args in ([f"hydra.run.dir={f}"], ["-m", "seed=0,1", f"hydra.sweep.dir={f}"]):
        p = launch(*sorted(args), *TINY, timeout=120)  # "-m" first
        assert p.returncode != 0 and _lines(p.stderr) == [
            f"error: {f} is a file, not a directory; choose another output dir"
        ], p.stderr
    assert f.read_text() == "mine"


def test_finished_checkpoint_writes_the_table_and_done_and_stale_temps_go(tmp_path):
    out = tmp_path / "job"
    assert launch(*TINY, "train.epochs=2", f"hydra.run.dir={out}").returncode == 0
    want = _frame(out)
    (out / DONE_FILE).unlink()  # killed after its last checkpoint, before `done`
    (out / RESULTS_FILE).unlink()
    (out / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    p = launch(*TINY, "train.epochs=2", f"hydra.run.dir={out}")
    assert p.returncode == 0, p.stderr
    assert "has all 2 epochs" in p.stdout and "Per-layer collapse" in p.stdout
    assert (out / DONE_FILE).exists() and not list(out.glob(".*.tmp"))
    pd.testing.assert_frame_equal(_frame(out), want)


# --------------------------------------------------------------- slow: kill, resume, lock
SLOW = [*TINY, "train.epochs=8", "arch.width=32", "arch.blocks=3"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of SLOW."""
    ref = tmp_path_factory.mktemp("ref") / "job"
    p = launch(*SLOW, f"hydra.run.dir={ref}")
    assert p.returncode == 0, p.stderr
    return ref


def _start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "launch.py"), *SLOW, *extra, f"hydra.run.dir={out}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )  # fmt: skip


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not (out / CHECKPOINT_FILE).exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint"
        time.sleep(0.05)


@pytest.mark.slow
def test_acceptance1_a_changed_config_never_resumes(tmp_path, reference):
    out = tmp_path / "job"
    proc = _start(out)
    _wait_for_checkpoint(out, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / DONE_FILE).exists()
    before = _snapshot(out)
    p = launch(*SLOW, "train.epochs=9", f"hydra.run.dir={out}")
    assert p.returncode != 0
    lines = _lines(p.stderr)
    assert len(lines) == 1 and "train.epochs=8, this run has train.epochs=9" in lines[0], p.stderr
    assert _snapshot(out) == before  # not a byte touched
    p = launch(*SLOW, f"hydra.run.dir={out}")
    assert p.returncode == 0 and "Resuming" in p.stdout, p.stderr
    pd.testing.assert_frame_equal(_frame(out), _frame(reference))
    # the same for another seed on a done dir
    before = _snapshot(reference)
    p = launch(*SLOW, "seed=1", f"hydra.run.dir={reference}")
    assert p.returncode != 0 and "seed=0, this run has seed=1" in p.stderr, p.stderr
    assert len(_lines(p.stderr)) == 1 and _snapshot(reference) == before


@pytest.mark.slow
def test_acceptance2_one_process_per_job_dir(tmp_path, reference):
    out = tmp_path / "job"
    first = _start(out)
    _wait_for_checkpoint(out, first)
    # hold the first job (and its lock) still: otherwise it may finish its few fast epochs
    # and release the dir before the second process gets there
    first.send_signal(signal.SIGSTOP)
    try:
        second = _start(out, "seed=1")
        # the first job is stopped holding the lock: a second that waited for it would
        # never return, and communicate() would raise TimeoutExpired
        _, err = second.communicate(timeout=60)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode != 0
    assert _lines(err) == [_lines(err)[0]] and f"{out} is in use by another job" in err, err
    assert f"pid {first.pid}" in err
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    _, meta = read_results(out)
    assert meta["status"] == "done" and meta["config"]["seed"] == 0
    pd.testing.assert_frame_equal(_frame(out), _frame(reference))
