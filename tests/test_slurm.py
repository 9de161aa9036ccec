"""Sweeps on a real SLURM cluster through hydra-submitit-launcher (issue 6).

Each test runs ``python launch.py -m ... hydra/launcher=slurm`` as a subprocess from the repo root and
checks what lands in the sweep dir against an independent run of the same jobs with Hydra's basic
(in-process) launcher.  They need a reachable cluster with a CPU partition (``local`` by default):

    scripts/slurm-local.sh start      # single-node cluster on this machine (root), ~1 min
    pytest -m slurm tests/test_slurm.py

and are skipped when none is reachable, unless ``PFC_REQUIRE_SLURM=1`` (CI sets it once the cluster
is up), which turns the skip into a failure.

The config keys of launch.py used here are collected in the constants below.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pytest
from slurm_cluster import SLURM_LAUNCHER, require_slurm

from pfc_sweeps.results.schema import DONE_FILE, ERROR_FILE, RESULTS_FILE, read_results

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Not .resolve(): the tests run launch.py from the checkout they are in.
REPO_ROOT = Path(__file__).absolute().parents[1]

# --- the cluster -------------------------------------------------------------------------------
BASIC_LAUNCHER = ("hydra/launcher=basic",)

# --- config keys of launch.py (adjust here when they change) -----------------------------------
COMMON = ("logger=none",)
# (1) two tiny training jobs
TRAIN = ("dataset=digits", "train.epochs=3")
TRAIN_SWEEP = "seed=0,1"
TRAIN_SEEDS = (0, 1)
# (2) surrogate λ-sweep as a job array
SURROGATE_TASK = "surrogate"  # the `task` column; task=mufm is its MUFM preset
SURROGATE = ("task=mufm", "surrogate.steps=50", "seed=0")
SURROGATE_LAMS = (0.001, 0.005)
SURROGATE_SWEEP = "lam.lam=" + ",".join(str(lam) for lam in SURROGATE_LAMS)
# (3) requeue: long enough that the job is still running after its first checkpoint
REQUEUE_TRAIN = ("dataset=digits", "train.epochs=40", "seed=0")
CHECKPOINT_NAME = "checkpoint.pt"  # written in the job dir after each epoch
RESUME_LOG = re.compile(r"resum", re.IGNORECASE)  # the task logs a line like this when it resumes
# (4) one good and one failing job in a sweep; the failure happens inside the job
GOOD_DATASET, BAD_DATASET = "digits", "cifar10"
MISSING_ROOT = "/no/such/dir"
FAILING = ("train.epochs=2", "seed=0", f"dataset.root={MISSING_ROOT}", "dataset.download=false")
FAILING_SWEEP = f"dataset={GOOD_DATASET},{BAD_DATASET}"

# --- results contract (pfc_sweeps.results.schema) -------------------------------------------------
PER_SWEEP_COLUMNS = ["run_id", "sweep_id"]  # differ between two sweeps of the same jobs
ROW_KEY = ["task", "dataset", "arch", "loss", "seed", "lam", "lam_w", "epoch", "split", "layer"]
ROW_KEY += ["rel_pos", "metric", "model"]
VALUE_RTOL = 1e-10  # same code, same data, OMP_NUM_THREADS=1 on both sides: equal up to rounding

# --- time limits (seconds) ---------------------------------------------------------------------
SWEEP_TIMEOUT_S = 900
CHECKPOINT_WAIT_S = 600


# ================================================================================================
@pytest.fixture(scope="module", autouse=True)
def slurm_cluster() -> None:
    require_slurm()
    if not (REPO_ROOT / "launch.py").is_file():
        pytest.fail(f"{REPO_ROOT / 'launch.py'} not found")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # One intra-op thread everywhere, so that a SLURM job (OMP_NUM_THREADS from cpus_per_task=1
    # in the launcher's setup lines) and the basic launcher compute the same floats.
    env.update(
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled", HYDRA_FULL_ERROR="1"
    )
    env.pop("SLURM_JOB_ID", None)  # the tests themselves may run inside a SLURM job
    return env


def _cmd(overrides: Sequence[str], sweep_dir: Path) -> list[str]:
    return [sys.executable, "launch.py", "-m", *overrides, *COMMON, f"hydra.sweep.dir={sweep_dir}"]


def _launch(
    overrides: Sequence[str], sweep_dir: Path, *, expect_ok: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run one `launch.py -m` sweep to the end; its output is kept next to the sweep dir."""
    cmd = _cmd(overrides, sweep_dir)
    try:
        res = subprocess.run(
            cmd,
            cwd=REPO_ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=SWEEP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        _cancel_jobs(sweep_dir)
        pytest.fail(f"sweep did not finish in {SWEEP_TIMEOUT_S} s: {' '.join(cmd)}\n{e.stderr}")
    sweep_dir.parent.joinpath(f"{sweep_dir.name}.log").write_text(res.stdout + res.stderr)
    if expect_ok:
        assert res.returncode == 0, (
            f"{' '.join(cmd)} exited {res.returncode}\n{_tail(res.stdout + res.stderr)}"
            f"\n{_job_logs(sweep_dir)}"
        )
    return res


def _tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


def _job_logs(sweep_dir: Path) -> str:
    """The tail of every submitit job log of a sweep, for failure messages."""
    out = []
    for log in sorted((sweep_dir / ".submitit").glob("*/*_log.*")):
        out.append(f"--- {log}\n{_tail(log.read_text(errors='replace'), 30)}")
    return "\n".join(out)


def _slurm_job_ids(sweep_dir: Path) -> list[str]:
    """SLURM ids of the jobs of a sweep ('123' or '123_0'), from the submitit folder names."""
    ids = [p.parent.name for p in (sweep_dir / ".submitit").glob("*/*_submitted.pkl")]
    return sorted(ids, key=lambda j: [int(x) for x in j.split("_")])


def _cancel_jobs(sweep_dir: Path) -> None:
    ids = _slurm_job_ids(sweep_dir)
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30, check=False)


def _sacct_states(job_id: str, *, all_records: bool = False) -> list[str]:
    """sacct states of a job (or of all tasks of an array), one per record."""
    cmd = ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State"]
    if all_records:
        cmd.insert(1, "-D")  # also the records a requeue replaced
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True)
    return [line.split("|")[1].split()[0] for line in res.stdout.splitlines() if "|" in line]


def _wait_for_sacct(job_ids: Sequence[str], states: set[str], timeout: float = 60) -> None:
    """sacct is fed asynchronously by slurmctld: wait until every job has reached `states`."""
    deadline = time.monotonic() + timeout
    while True:
        got = {j: _sacct_states(j) for j in job_ids}
        if all(s and set(s) <= states for s in got.values()):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"sacct states {got}, expected all in {sorted(states)}")
        time.sleep(1)


def _result_files(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.rglob(RESULTS_FILE) if ".submitit" not in p.parts)


def _read(path: Path) -> tuple[pd.DataFrame, dict]:
    """(rows, metadata) of a job's results file."""
    return read_results(path)


def _results_by_job(sweep_dir: Path, key: str) -> dict[object, tuple[Path, pd.DataFrame, dict]]:
    """The results of a sweep, keyed by the value of column `key` (one value per job)."""
    out: dict[object, tuple[Path, pd.DataFrame, dict]] = {}
    for path in _result_files(sweep_dir):
        df, meta = _read(path)
        values = df[key].dropna().unique()  # model=data rows have lam=NaN (X has no λ)
        assert len(values) == 1, f"{path}: expected one {key} per job, got {values}"
        assert values[0] not in out, f"two jobs with {key}={values[0]}: {out[values[0]][0]}, {path}"
        out[values[0]] = (path, df, meta)
    return out


def _assert_finished(path: Path, meta: dict) -> None:
    assert meta.get("status") == "done", f"{path}: status {meta.get('status')!r}, expected 'done'"
    assert (path.parent / DONE_FILE).is_file(), f"no {DONE_FILE} marker next to {path}"


def _normalised(df: pd.DataFrame) -> pd.DataFrame:
    """Rows without the per-sweep ids, in a canonical order."""
    df = df.drop(columns=PER_SWEEP_COLUMNS)
    return df.sort_values(list(df.columns), kind="stable", na_position="first").reset_index(
        drop=True
    )


def _assert_same_results(got: pd.DataFrame, want: pd.DataFrame, what: str) -> None:
    assert not got.empty, f"{what}: no rows"
    dup = got.duplicated(subset=ROW_KEY, keep=False)
    assert not dup.any(), f"{what}: duplicate rows\n{got[dup].head(20)}"
    assert got["run_id"].nunique() == 1, f"{what}: run_id not stable: {got['run_id'].unique()}"
    pd.testing.assert_frame_equal(
        _normalised(got), _normalised(want), check_exact=False, rtol=VALUE_RTOL, atol=0.0
    )


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    """Poll `predicate` every 0.1 s; fail after `timeout` s or when `proc` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"launch.py exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


# ================================================================================================
def test_training_sweep_matches_basic_launcher(tmp_path: Path) -> None:
    """Two tiny training jobs as one SLURM array land the same rows as the basic launcher."""
    on_slurm, basic = tmp_path / "slurm", tmp_path / "basic"
    _launch([*SLURM_LAUNCHER, *TRAIN, TRAIN_SWEEP], on_slurm)
    _launch([*BASIC_LAUNCHER, *TRAIN, TRAIN_SWEEP], basic)

    ids = _slurm_job_ids(on_slurm)
    assert len(ids) == len(TRAIN_SEEDS) and all("_" in j for j in ids), f"not one array: {ids}"
    assert len({j.split("_")[0] for j in ids}) == 1, f"not one array: {ids}"
    _wait_for_sacct(ids, {"COMPLETED"})

    got, want = _results_by_job(on_slurm, "seed"), _results_by_job(basic, "seed")
    assert sorted(got) == list(TRAIN_SEEDS), f"seeds on SLURM: {sorted(got)}"
    assert sorted(want) == list(TRAIN_SEEDS), f"seeds with the basic launcher: {sorted(want)}"
    for seed in TRAIN_SEEDS:
        path, df, meta = got[seed]
        _assert_finished(path, meta)
        _assert_finished(want[seed][0], want[seed][2])
        assert df["sweep_id"].nunique() == 1
        _assert_same_results(df, want[seed][1], f"seed {seed}")
    # one sweep id shared by both jobs, distinct run ids
    runs = {seed: got[seed][1]["run_id"].iloc[0] for seed in TRAIN_SEEDS}
    assert len(set(runs.values())) == len(TRAIN_SEEDS), f"run ids not unique: {runs}"
    sweeps = {got[seed][1]["sweep_id"].iloc[0] for seed in TRAIN_SEEDS}
    assert len(sweeps) == 1, f"jobs of one sweep have different sweep ids: {sweeps}"


def test_surrogate_lambda_sweep_is_a_job_array(tmp_path: Path) -> None:
    """A λ-sweep of the surrogate runs as one job array; each λ equals its basic-launcher run."""
    on_slurm, basic = tmp_path / "slurm", tmp_path / "basic"
    _launch([*SLURM_LAUNCHER, *SURROGATE, SURROGATE_SWEEP], on_slurm)
    _launch([*BASIC_LAUNCHER, *SURROGATE, SURROGATE_SWEEP], basic)

    ids = _slurm_job_ids(on_slurm)
    array_ids = {j.split("_")[0] for j in ids}
    assert len(ids) == len(SURROGATE_LAMS) and len(array_ids) == 1, f"not one array: {ids}"
    (array_id,) = array_ids
    assert sorted(int(j.split("_")[1]) for j in ids) == list(range(len(SURROGATE_LAMS)))
    _wait_for_sacct([array_id], {"COMPLETED"})
    assert len(_sacct_states(array_id)) == len(SURROGATE_LAMS)

    got, want = _results_by_job(on_slurm, "lam"), _results_by_job(basic, "lam")
    assert sorted(got) == pytest.approx(sorted(SURROGATE_LAMS)), f"λ on SLURM: {sorted(got)}"
    assert sorted(want) == pytest.approx(sorted(SURROGATE_LAMS))
    for lam in got:
        path, df, meta = got[lam]
        _assert_finished(path, meta)
        assert set(df["task"]) == {SURROGATE_TASK}
        _assert_same_results(df, want[lam][1], f"lam {lam}")


def test_requeued_job_resumes_from_checkpoint(tmp_path: Path) -> None:
    """`scontrol requeue` mid-run: the job resumes and ends with the uninterrupted run's rows."""
    on_slurm, basic = tmp_path / "slurm", tmp_path / "basic"
    log = (tmp_path / "slurm.log").open("w")
    proc = subprocess.Popen(
        _cmd([*SLURM_LAUNCHER, *REQUEUE_TRAIN], on_slurm),
        cwd=REPO_ROOT,
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        (job_id,) = _wait(lambda: _slurm_job_ids(on_slurm), 120, "the job's submitit folder", proc)

        def checkpoint() -> Path | None:
            found = [p for p in on_slurm.rglob(CHECKPOINT_NAME) if ".submitit" not in p.parts]
            return found[0] if found else None

        ckpt = _wait(checkpoint, CHECKPOINT_WAIT_S, f"{CHECKPOINT_NAME} of job {job_id}", proc)
        job_dir = ckpt.parent
        assert not (job_dir / DONE_FILE).exists(), (
            f"job finished before it could be requeued: raise train.epochs in {REQUEUE_TRAIN}"
        )
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)

        # SLURM starts a requeued job again after AuthInfo=cred_expire (10 s on the local cluster
        # of scripts/slurm-local.sh, 120 s by default); submitit waits for it.
        rc = proc.wait(timeout=SWEEP_TIMEOUT_S)
    except BaseException:
        proc.kill()
        _cancel_jobs(on_slurm)
        raise
    finally:
        proc.wait(timeout=60)
        log.close()
    output = (tmp_path / "slurm.log").read_text()
    assert rc == 0, f"sweep exited {rc}\n{_tail(output)}\n{_job_logs(on_slurm)}"

    # SLURM requeued it, and the job ran twice: the second time resuming from its checkpoint.
    _wait_for_sacct([job_id], {"COMPLETED"})
    assert "REQUEUED" in _sacct_states(job_id, all_records=True)
    submitit_logs = "\n".join(
        p.read_text(errors="replace") for p in (on_slurm / ".submitit" / job_id).glob("*_log.*")
    )
    assert submitit_logs.count("Starting with JobEnvironment") == 2, _job_logs(on_slurm)
    logs = submitit_logs + "\n".join(p.read_text(errors="replace") for p in job_dir.glob("*.log"))
    logs = logs.replace(str(tmp_path), "<tmp>")  # the test's own name says "resumes"
    assert RESUME_LOG.search(logs), f"no line matching {RESUME_LOG.pattern!r} in the job's logs"

    _launch([*BASIC_LAUNCHER, *REQUEUE_TRAIN], basic)
    (got,), (want,) = _result_files(on_slurm), _result_files(basic)
    (df, meta), (want_df, _) = _read(got), _read(want)
    _assert_finished(got, meta)
    _assert_same_results(df, want_df, "requeued job")


def test_failing_job_fails_the_sweep_and_spares_the_others(tmp_path: Path) -> None:
    """A job that raises makes the sweep exit non-zero; the other job's results are complete."""
    on_slurm, basic = tmp_path / "slurm", tmp_path / "basic"
    res = _launch([*SLURM_LAUNCHER, *FAILING, FAILING_SWEEP], on_slurm, expect_ok=False)
    output = res.stdout + res.stderr
    assert res.returncode != 0, f"a failed job went unreported: exit 0\n{_tail(output)}"
    assert MISSING_ROOT in output, f"the job's error is not reported:\n{_tail(output)}"
    # the sweep's report names the failed job's dir and its one-line error, also in error.txt
    errors = [p for p in on_slurm.rglob(ERROR_FILE) if ".submitit" not in p.parts]
    assert len(errors) == 1 and MISSING_ROOT in errors[0].read_text(), errors
    assert f"{errors[0].parent}: " in res.stderr and "failed:" in res.stderr, _tail(res.stderr)

    ids = _slurm_job_ids(on_slurm)
    assert len(ids) == 2, f"expected two jobs: {ids}"
    # The plugin hands the job's exception back as its result: SLURM may call the job COMPLETED.
    _wait_for_sacct(ids, {"COMPLETED", "FAILED"})

    by_dataset = {}
    for path in _result_files(on_slurm):
        df, meta = _read(path)
        by_dataset[meta["config"]["dataset"]["name"]] = (path, df, meta)
    assert GOOD_DATASET in by_dataset, f"the good job left no results: {sorted(by_dataset)}"
    if BAD_DATASET in by_dataset:  # a failed job may leave a results file, never a done marker
        path, _, meta = by_dataset[BAD_DATASET]
        assert meta.get("status") == "failed", f"{path}: status {meta.get('status')!r}"
        assert not (path.parent / DONE_FILE).exists(), f"{path.parent} failed but is marked done"
    done = [p for p in on_slurm.rglob(DONE_FILE) if ".submitit" not in p.parts]
    assert len(done) == 1, f"expected one {DONE_FILE} marker: {done}"

    # The good job's results are whole: equal to the same job run alone with the basic launcher.
    _launch([*BASIC_LAUNCHER, *FAILING, f"dataset={GOOD_DATASET}"], basic)
    path, df, meta = by_dataset[GOOD_DATASET]
    _assert_finished(path, meta)
    (want,) = _result_files(basic)
    _assert_same_results(df, _read(want)[0], f"{GOOD_DATASET} next to a failing job")
