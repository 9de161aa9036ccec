"""One sweep dir, one sweep (issue 21): the sweep lock, the sweep record, per-invocation errors.

Unit tests of :mod:`pfc_sweeps.jobs.sweepdir` (job numbers compared with Hydra's own
BasicSweeper), then the acceptance tests of the issue through ``launch.py -m``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, launch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import open_dict
from slurm_cluster import SLURM_LAUNCHER, require_slurm

from pfc_sweeps.config import register_configs
from pfc_sweeps.jobs.callbacks import SweepReport
from pfc_sweeps.jobs.sweepdir import (
    INVOCATION_ENV,
    SweepDirError,
    SweepLock,
    check_record,
    errors_dir,
    invocation_failures,
    jobs_of,
    sweep_axes,
    write_record,
)
from pfc_sweeps.results.schema import (
    CHECKPOINT_FILE,
    SWEEP_ERRORS_DIR,
    SWEEP_LOCK_FILE,
    SWEEP_RECORD_FILE,
    read_results,
)

register_configs()
TINY = ["logger=none", "arch.width=16", "arch.blocks=3", "train.geodesic_points=3"]


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def _snapshot(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` but log files (relative path -> bytes)."""
    files = (p for p in sorted(d.rglob("*")) if p.is_file() and p.suffix != ".log")
    return {str(p.relative_to(d)): p.read_bytes() for p in files}


def _hydra_jobs(lines: list[str]) -> list[frozenset[str]]:
    """Hydra's own job list for these overrides (the independent computation)."""
    overrides = OverridesParser.create().parse_overrides(lines)
    return [frozenset(job) for job in BasicSweeper.split_arguments(overrides, None)[0]]


def _hold(path: Path, cls: str = "SweepLock") -> subprocess.Popen:
    """A process that holds ``path``'s sweep lock until killed."""
    code = (
        f"from pfc_sweeps.jobs.sweepdir import {cls}; import time; "
        f"{cls}({str(path)!r}).acquire().claim('inv-held'); print('locked', flush=True); "
        "time.sleep(120)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


# ------------------------------------------------------------------------------ units
@pytest.mark.parametrize(
    "lines",
    [
        ["seed=0,1,2", "train.epochs=2"],
        ["train.epochs=2", "seed=0,1", "lam.lam=0.1,0.2,0.3"],
        ["seed=3", "optim.lr=0.1,0.01", "seed=0,1"],  # a key twice: first place, last value
        ["dataset=digits,gaussian", "seed=range(0,3)", "+extra=x"],
    ],
)
def test_job_numbers_are_hydras(lines):
    assert jobs_of(sweep_axes(lines)) == _hydra_jobs(lines)
    params = {"seed": "0,1"}  # hydra.sweeper.params come first
    want = _hydra_jobs(["seed=0,1", *lines])
    assert jobs_of(sweep_axes(lines, params)) == want


def test_how_a_job_runs_is_not_part_of_the_sweep():
    base = ["seed=0,1", "train.epochs=2"]
    moved = [*base, "logger=wandb", "train.device=cpu", "train.num_workers=2"]
    assert sweep_axes(moved) == sweep_axes(base)
    assert sweep_axes(["train.epochs=2", "seed=0,1"]) != sweep_axes(base)  # reordered
    assert jobs_of(sweep_axes(["train.epochs=2", "seed=0,1"])) == jobs_of(sweep_axes(base))


def test_record_same_extension_replacement_and_refusal(tmp_path):
    axes = sweep_axes(["seed=0,1", "lam.lam=0.1,0.2", "train.epochs=2"])
    assert check_record(tmp_path, axes) == "new"
    write_record(tmp_path, axes, "inv")
    same = ["train.epochs=2", "seed=0,1", "lam.lam=0.1,0.2", "logger=none"]
    assert check_record(tmp_path, sweep_axes(same)) == "same"
    # appending values to the outermost swept key keeps jobs 0..3: an extension
    more = ["seed=0,1,2", "lam.lam=0.1,0.2", "train.epochs=2"]
    assert check_record(tmp_path, sweep_axes(more)) == "extends"
    assert check_record(tmp_path, sweep_axes(["seed=0,1,2", "lam.lam=0.1,0.2"])) == "replaces"
    # a fixed key turned into a sweep before every swept key: an extension too
    fixed = tmp_path / "fixed"
    write_record(fixed, sweep_axes(["seed=0", "lam.lam=0.1,0.2"]), "inv")
    assert check_record(fixed, sweep_axes(["seed=0,1", "lam.lam=0.1,0.2"])) == "extends"
    assert check_record(fixed, sweep_axes(["lam.lam=0.1,0.2", "seed=0,1"])) == "replaces"
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "fingerprint.json").write_text("{}")  # job 0 has results now
    cases = {
        ("seed=0,1", "lam.lam=0.1,0.2,0.3", "train.epochs=2"): "lam.lam=0.1,0.2 (this sweep: "
        "lam.lam=0.1,0.2,0.3); added values keep every job's number only at the end of the "
        "first swept key",
        ("seed=5,6", "lam.lam=0.1,0.2", "train.epochs=3"): "seed=0,1 (this sweep: seed=5,6); "
        "train.epochs=2 (this sweep: train.epochs=3)",
        ("lam.lam=0.1,0.2", "seed=0,1", "train.epochs=2"): "swept keys in the order seed, "
        "lam.lam (this sweep: lam.lam, seed), which numbers the jobs differently",
        ("seed=0,1", "lam.lam=0.1,0.2", "train.epochs=2", "+x=1"): "+x unset (this sweep: +x=1)",
    }
    for lines, what in cases.items():
        new = sweep_axes(list(lines))
        assert check_record(tmp_path, axes) == "same"
        with pytest.raises(SweepDirError) as e:
            check_record(tmp_path, new)
        assert str(e.value) == (
            f"{tmp_path} holds another sweep: {what}; rerun the "
            f"sweep recorded in {SWEEP_RECORD_FILE} to resume it, or use a new hydra.sweep.dir"
        )


def test_sweep_lock_is_exclusive_names_the_holder_and_dies_with_it(tmp_path):
    holder = _hold(tmp_path)
    try:
        with pytest.raises(SweepDirError) as e:
            SweepLock(tmp_path).acquire()
        assert str(e.value).startswith(
            f"{tmp_path} is in use by another sweep (host {os.uname().nodename} "
            f"pid {holder.pid} invocation inv-held); wait for it to end"
        )
        # a job of the sweep finds the invocation id in the lock when its environment lacks it
        env = {k: v for k, v in os.environ.items() if k != INVOCATION_ENV}
        code = (
            f"from pfc_sweeps.jobs.sweepdir import errors_dir; print(errors_dir({str(tmp_path)!r}))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO
        )
        assert out.stdout.strip() == str(tmp_path / SWEEP_ERRORS_DIR / "inv-held"), out.stderr
    finally:
        holder.kill()
        holder.wait()
    with SweepLock(tmp_path) as lock:  # the kernel freed the dead holder's lock
        lock.claim("mine")
        assert "invocation mine" in (tmp_path / SWEEP_LOCK_FILE).read_text()
    assert not (tmp_path / SWEEP_LOCK_FILE).exists()


def test_each_invocation_reads_only_its_own_failures(tmp_path, monkeypatch):
    for inv, num in [("a", 0), ("b", 1), ("a", 10), ("a", 2)]:
        folder = errors_dir(tmp_path, inv)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{num}.txt").write_text(f"{tmp_path / str(num)}\nerror of {inv} {num}\n")
    (tmp_path / SWEEP_ERRORS_DIR / "1.txt").write_text("old layout\nshared record\n")
    got = invocation_failures(tmp_path, "a")
    assert got == [(str(tmp_path / n), f"error of a {n}") for n in ("0", "2", "10")]
    monkeypatch.setenv(INVOCATION_ENV, "b")
    assert errors_dir(tmp_path) == tmp_path / SWEEP_ERRORS_DIR / "b"


def _multirun_config(sweep_dir: str, *task: str):
    """The config the callback gets in ``launch.py -m TASK hydra.sweep.dir=SWEEP_DIR``."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.sweep.dir = sweep_dir
        cfg.hydra.overrides.task = list(task)
    return cfg


def test_callback_refuses_a_held_sweep_dir_before_any_job(tmp_path, capsys):
    """The lock is taken by the callback too (a sweep dir Hydra alone resolves)."""
    sweep = tmp_path / "s"
    sweep.mkdir()
    holder = _hold(sweep)
    try:
        with pytest.raises(SystemExit) as e:
            SweepReport().on_multirun_start(_multirun_config(str(sweep), "seed=0,1"))
        assert e.value.code == 1
        err = _lines(capsys.readouterr().err)
        assert len(err) == 1 and f"{sweep} is in use by another sweep" in err[0]
        assert f"pid {holder.pid}" in err[0] and INVOCATION_ENV not in os.environ
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in sweep.iterdir()) == [SWEEP_LOCK_FILE]  # nothing else


# ------------------------------------------------------------------ acceptance (launch.py)
def _start(sweep: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline"}
    env.pop("SLURM_JOB_ID", None)
    return subprocess.Popen(
        [sys.executable, str(REPO / "launch.py"), "-m", *TINY, *overrides,
         f"hydra.sweep.dir={sweep}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"launch.py exited ({proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _seeds(sweep: Path, n: int) -> list[int]:
    out = []
    for j in range(n):
        df, meta = read_results(sweep / str(j))
        assert meta["status"] == "done" and df["seed"].nunique() == 1
        out.append(int(df["seed"].iloc[0]))
    return out


@pytest.mark.slow
def test_acceptance1_a_second_sweep_never_shares_a_running_sweeps_dir(tmp_path):
    sweep = tmp_path / "s"
    first = _start(sweep, "seed=0,1", "train.epochs=3")
    _wait_for(lambda: (sweep / "0" / CHECKPOINT_FILE).exists(), first, "job 0's checkpoint")
    first.send_signal(signal.SIGSTOP)  # hold the first sweep (and its job 0) still
    try:
        before = _snapshot(sweep)
        # the dir on the command line (checked before Hydra) and one only Hydra resolves
        for where, env in [(str(sweep), {}), ("${oc.env:PFC_TEST_SWEEP}", {"PFC_TEST_SWEEP": str(sweep)})]:  # fmt: skip
            p = launch("-m", *TINY, "seed=5,6", "train.epochs=3", f"hydra.sweep.dir={where}",
                       env=env, timeout=120)  # fmt: skip
            assert p.returncode == 1
            assert _lines(p.stderr) == [
                f"error: {sweep} is in use by another sweep (host {os.uname().nodename} pid "
                f"{first.pid} invocation {_invocation(sweep)}); wait for it to end (or stop "
                "that process) or use a new hydra.sweep.dir"
            ], p.stderr
            assert _snapshot(sweep) == before  # no job ran, nothing was written
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert "failed" not in err and _seeds(sweep, 2) == [0, 1]


def _invocation(sweep: Path) -> str:
    m = re.search(r"invocation (\S+)", (sweep / SWEEP_LOCK_FILE).read_text())
    assert m, "no invocation in the lock file"
    return m.group(1)


@pytest.mark.slow
def test_acceptance2_another_grid_is_refused_an_extension_is_not(tmp_path):
    sweep = tmp_path / "s"
    p = launch("-m", *TINY, "seed=0,1", "train.epochs=1", f"hydra.sweep.dir={sweep}")
    assert p.returncode == 0, p.stderr
    before = _snapshot(sweep)
    for grid, what in [
        (["seed=5,6", "train.epochs=1"], "seed=0,1 (this sweep: seed=5,6)"),
        (["seed=0,1", "train.epochs=1,2"], "train.epochs=1 (this sweep: train.epochs=1,2); "
         "added values keep every job's number only at the end of the first swept key"),
    ]:  # fmt: skip
        p = launch("-m", *TINY, *grid, f"hydra.sweep.dir={sweep}")
        assert p.returncode == 1
        assert _lines(p.stderr) == [
            f"error: {sweep} holds another sweep: {what}; rerun the sweep recorded in "
            f"{SWEEP_RECORD_FILE} to resume it, or use a new hydra.sweep.dir"
        ], p.stderr
        assert _snapshot(sweep) == before
    # a pure extension: jobs 0 and 1 keep their numbers and configs, job 2 is new
    p = launch("-m", *TINY, "seed=0,1,2", "train.epochs=1", f"hydra.sweep.dir={sweep}")
    assert p.returncode == 0, p.stderr
    assert _seeds(sweep, 3) == [0, 1, 2]
    after = _snapshot(sweep)
    for name, data in before.items():
        if name.split("/")[0] in ("0", "1"):
            assert after[name] == data, name


@pytest.mark.slow
def test_acceptance3_rerun_after_sigkill_resumes_and_reports_only_its_own(tmp_path):
    sweep = tmp_path / "s"
    grid = ["seed=0,1", "train.epochs=3"]
    first = _start(sweep, *grid)
    _wait_for(lambda: (sweep / "0" / CHECKPOINT_FILE).exists(), first, "job 0's checkpoint")
    first.send_signal(signal.SIGKILL)
    first.wait()
    old = _invocation(sweep)  # the killed submitter's lock file stays behind
    second = _start(sweep, *grid)
    _wait_for(lambda: _invocation(sweep) != old, second, "the second sweep's lock")
    second.send_signal(signal.SIGSTOP)
    # a job of the killed invocation (e.g. still running on SLURM) fails now: its record
    # (and one where a shared .errors/ kept it) must not enter the second sweep's report
    for folder in (sweep / SWEEP_ERRORS_DIR / old, sweep / SWEEP_ERRORS_DIR):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "1.txt").write_text(f"{sweep / '1'}\nan orphan job of {old} failed\n")
    second.send_signal(signal.SIGCONT)
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err
    assert "failed" not in err and "Resuming" in out
    assert _seeds(sweep, 2) == [0, 1]
    assert not (sweep / SWEEP_LOCK_FILE).exists()


def test_a_sweep_whose_jobs_all_fail_early_leaves_no_record(tmp_path):
    empty, sweep = tmp_path / "empty", tmp_path / "s"
    empty.mkdir()
    p = launch("-m", *TINY, "dataset=mnist,cifar100", f"dataset.root={empty}",
               "dataset.download=false", "train.epochs=1", f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert p.returncode == 1 and "error: 2 job(s) of the sweep failed:" in p.stderr, p.stderr
    assert not (sweep / SWEEP_RECORD_FILE).exists() and not (sweep / SWEEP_LOCK_FILE).exists()
    (inv,) = (sweep / SWEEP_ERRORS_DIR).iterdir()
    assert sorted(f.name for f in inv.iterdir()) == ["0.txt", "1.txt"]


# --------------------------------------------------------------------------- SLURM


def _submitted(sweep: Path) -> list[str]:
    return sorted(p.parent.name for p in (sweep / ".submitit").glob("*/*_submitted.pkl"))


@pytest.mark.slurm
@pytest.mark.slow
def test_acceptance4_slurm_a_second_submission_is_refused_before_sbatch(tmp_path):
    require_slurm()
    sweep, root = tmp_path / "s", "/no/such/dir"
    grid = ["dataset=digits,cifar10", f"dataset.root={root}", "dataset.download=false"]
    first = _start(sweep, *SLURM_LAUNCHER, *grid, "train.epochs=2")
    try:
        _wait_for(lambda: len(_submitted(sweep)) == 2, first, "the first sweep's sbatch")
        first.send_signal(signal.SIGSTOP)  # the submitter waits (stopped); its jobs run on
        try:
            jobs, held = _submitted(sweep), _invocation(sweep)
            for where, env in [(str(sweep), {}), ("${oc.env:PFC_TEST_SWEEP}", {"PFC_TEST_SWEEP": str(sweep)})]:  # fmt: skip
                p = launch("-m", *TINY, *SLURM_LAUNCHER, "seed=5,6", "train.epochs=2",
                           f"hydra.sweep.dir={where}", env=env, timeout=120)  # fmt: skip
                assert p.returncode == 1
                err = _lines(p.stderr)
                assert len(err) == 1 and f"{sweep} is in use by another sweep" in err[0], err
                assert f"pid {first.pid} invocation {held}" in err[0]
                assert _submitted(sweep) == jobs  # refused before sbatch
        finally:
            first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=900)
    except BaseException:
        first.kill()
        subprocess.run(["scancel", *_submitted(sweep)], capture_output=True, timeout=30)
        raise
    # the first sweep reports its own failure (cifar10 has no data), recorded per invocation
    assert first.returncode == 1
    report = err[err.index("error: 1 job(s) of the sweep failed:") :]
    assert _lines(report)[1].startswith(f"  {sweep / '1'}: ") and root in report, err
    assert [p.name for p in (sweep / SWEEP_ERRORS_DIR).iterdir()] == [held]
    assert [p.name for p in (sweep / SWEEP_ERRORS_DIR / held).iterdir()] == ["1.txt"]
    df, meta = read_results(sweep / "0")
    assert meta["status"] == "done" and set(df["dataset"]) == {"digits"}


@pytest.mark.slurm
@pytest.mark.slow
def test_acceptance5_slurm_jobs_of_a_killed_submitter_block_its_rerun_until_gone(tmp_path):
    require_slurm()
    sweep, grid = tmp_path / "s", ["seed=0,1", "train.epochs=1"]
    held = "+hydra.launcher.additional_parameters.hold=true"  # the array stays queued
    first = _start(sweep, *SLURM_LAUNCHER, *grid, held)
    try:
        _wait_for(lambda: len(_submitted(sweep)) == 2, first, "the first sweep's sbatch")
        first.send_signal(signal.SIGKILL)
        first.wait()
        array = _submitted(sweep)[0].split("_")[0]
        p = launch("-m", *TINY, *SLURM_LAUNCHER, *grid, f"hydra.sweep.dir={sweep}", timeout=120)
        assert p.returncode == 1
        assert _lines(p.stderr) == [
            f"error: {sweep}: SLURM job(s) {array} of an earlier submission (host "
            f"{os.uname().nodename} pid {first.pid} invocation {_invocation(sweep)}, no longer "
            "running) are still queued or running; wait for them to end (squeue) or scancel "
            "them, then rerun"
        ], p.stderr
        assert len(_submitted(sweep)) == 2  # refused before sbatch
    finally:
        subprocess.run(["scancel", *_submitted(sweep)], capture_output=True, timeout=30)
    deadline = time.time() + 60
    while array in subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True,
                                  text=True, timeout=30).stdout:  # fmt: skip
        assert time.time() < deadline, "scancel did not empty the queue"
        time.sleep(0.5)
    p = launch("-m", *TINY, *SLURM_LAUNCHER, *grid, f"hydra.sweep.dir={sweep}", timeout=600)
    assert p.returncode == 0, p.stderr
    assert _seeds(sweep, 2) == [0, 1]
