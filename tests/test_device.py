"""GPU hazards (issue 22), each checked here on the part that runs on a CPU; the CUDA-only
parts are marked ``gpu`` (run by ``benchmarks/device_check.sh``). See docs/gpu.md."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REPO
from hydra import compose, initialize_config_dir

from pfc_sweeps.config import register_configs, validate
from pfc_sweeps.errors import Diverged
from pfc_sweeps.jobs import accel
from pfc_sweeps.jobs import checkpoint as ckpt
from pfc_sweeps.jobs import measure as measure_mod
from pfc_sweeps.jobs import train as train_mod
from pfc_sweeps.results.loggers import NullLogger
from pfc_sweeps.results.schema import CHECKPOINT_FILE, read_results
from pfc_sweeps.results.sink import ResultsSink

register_configs()
CUDA = torch.cuda.is_available()
TINY = ["logger=none", "arch.width=16", "arch.blocks=2", "train.geodesic_points=3"]
META = dict(run_id="r", sweep_id="s", task="train", dataset="digits", arch="digits",
            loss="ce", seed=0, lam=math.nan, lam_w=math.nan)  # fmt: skip


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return validate(compose("config", [*TINY, *overrides]))


def _trainer(cfg, out: Path) -> train_mod.Trainer:
    return train_mod.Trainer(cfg, out, ResultsSink(out, META, {}), NullLogger())


def _flags() -> tuple:
    return (
        torch.get_float32_matmul_precision(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )


@pytest.fixture(autouse=True)
def _restore_global_flags():
    """Jobs set process-wide flags: put them back for the other tests."""
    before, env = _flags(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[1:3]
    torch.use_deterministic_algorithms(before[3], warn_only=before[4])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[5:]
    if env is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = env


# ---------------------------------------------------------------- 1. checkpoints and RNG
@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_resume_on_a_non_cpu_device_restores_the_rng_states_on_the_cpu(tmp_path, monkeypatch):
    """A job whose device is not the CPU resumes (the meta device stands in for a GPU).

    Loading with ``map_location=<job device>`` put the RNG states there, and
    ``Generator.set_state`` raised "RNG state must be a torch.ByteTensor"."""
    first = _trainer(_cfg("train.epochs=2"), tmp_path)
    first.run_epoch(1)
    first.close()
    saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)
    torch.manual_seed(123)  # something else than the checkpoint's state
    monkeypatch.setattr(train_mod, "resolve_device", lambda name: torch.device("meta"))
    second = _trainer(_cfg("train.epochs=2"), tmp_path)
    assert second.start_epoch == 2 and next(second.model.parameters()).is_meta
    assert torch.equal(torch.get_rng_state(), saved["rng"]["torch"])
    assert torch.equal(second.shuffle.get_state(), saved["shuffle"])


class _FakeCuda:
    """torch.cuda's RNG functions, recording what they are given."""

    def __init__(self, monkeypatch) -> None:
        self.set: list[tuple[torch.Tensor, torch.device]] = []
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: self.set.append((s, d)))
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: torch.full((8,), d.index))
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", self._forbidden)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self._forbidden)

    @staticmethod
    def _forbidden(*args):
        raise AssertionError("every GPU's RNG state touched")


def test_rng_state_holds_the_job_gpu_only_and_restores_it_as_cpu_bytes(monkeypatch):
    fake = _FakeCuda(monkeypatch)
    gpu1 = torch.device("cuda", 1)
    state = ckpt.rng_state(gpu1)
    assert state["cuda"].tolist() == [1] * 8 and torch.equal(state["torch"], torch.get_rng_state())
    # as if loaded onto another device, in another dtype: restored as CPU ByteTensors
    state = {"torch": state["torch"].long(), "cuda": state["cuda"].long()}
    ckpt.restore_rng_state(state, gpu1)
    (got, dev), = fake.set  # fmt: skip
    assert got.dtype == torch.uint8 and got.device.type == "cpu" and dev == gpu1
    ckpt.restore_rng_state(state, torch.device("cpu"))  # a GPU run resumed on the CPU
    assert len(fake.set) == 1


def test_old_checkpoints_with_every_gpu_state_restore_the_own_one_or_none(monkeypatch):
    fake = _FakeCuda(monkeypatch)
    every = [torch.full((8,), i, dtype=torch.uint8) for i in range(2)]  # saved with 2 GPUs
    cpu = torch.get_rng_state()
    ckpt.restore_rng_state({"torch": cpu, "cuda": every}, torch.device("cuda", 1))
    assert fake.set[-1][0].tolist() == [1] * 8
    ckpt.restore_rng_state({"torch": cpu, "cuda": every}, torch.device("cuda", 3))  # fewer GPUs
    assert len(fake.set) == 1
    ckpt.restore_rng_state({"torch": cpu}, torch.device("cuda", 0))  # a CPU run resumed on CUDA
    assert len(fake.set) == 1


# ------------------------------------------------------------- 2. deterministic, 3. TF32
def test_configure_job_sets_the_deterministic_flags_both_ways(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.backends.cudnn.benchmark = True
    accel.configure_job(_cfg("train.deterministic=true").train)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == accel.CUBLAS_WORKSPACE
    accel.configure_job(_cfg("train.deterministic=false").train)
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own setting wins
    accel.configure_job(_cfg().train)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert _cfg().train.deterministic  # the default


def test_deterministic_after_cuda_started_says_the_workspace_setting_came_late(monkeypatch, caplog):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    accel.configure_job(_cfg("train.deterministic=true").train)
    assert "export CUBLAS_WORKSPACE_CONFIG=:4096:8" in caplog.text
    caplog.clear()
    accel.configure_job(_cfg("train.deterministic=true").train)  # set now: nothing to say
    assert caplog.text == ""


def test_tf32_is_off_after_a_tf32_false_job_that_follows_a_tf32_true_one(tmp_path):
    from inprocess import run_in_process

    job = [*TINY, "train.epochs=1"]
    run_in_process(tmp_path / "a", *job, "train.tf32=true")
    assert _flags()[:3] == ("high", True, True)  # the first job turned TF32 on
    run_in_process(tmp_path / "b", *job, "train.tf32=false")
    assert _flags()[:3] == ("highest", False, False)
    for out in ("a", "b"):
        assert read_results(tmp_path / out)[1]["status"] == "done"


def _cpu_autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 (the lowest supported is 2.3) takes no device type
        return torch.is_autocast_cpu_enabled()


def _spy_collapse_table(monkeypatch, module) -> list[dict]:
    """Record, at every metric pass, its cache budget and the numerics in force."""
    calls: list[dict] = []
    real = module.collapse_table

    def spy(model, *args, **kw):
        seen = {
            "cache_bytes": kw["cache_bytes"],
            "tf32": _flags()[:3],
            "autocast": _cpu_autocast_on(),
            "dtypes": set(),
        }
        hook = torch.nn.Module.register_forward_hook
        hooks = [hook(m, lambda m, i, o: seen["dtypes"].add(o.dtype)) for m in model.modules()
                 if isinstance(m, torch.nn.Linear)]  # fmt: skip
        try:
            out = real(model, *args, **kw)
        finally:
            for h in hooks:
                h.remove()
        calls.append(seen)
        return out

    monkeypatch.setattr(module, "collapse_table", spy)
    return calls


def test_metric_forward_is_full_float32_in_training_and_in_measure(tmp_path, monkeypatch):
    """With train.tf32=true and bf16 autocast around the job, the metric pass's forward runs
    with TF32 off and autocast off (float32 features), in training and in task=measure."""
    from inprocess import run_in_process

    calls = _spy_collapse_table(monkeypatch, train_mod)
    trainer = _trainer(_cfg("train.epochs=1", "train.tf32=true", "train.precision=bf16"), tmp_path)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as if the caller trained under autocast
        trainer.run_epoch(1)
    trainer.close()
    assert _flags()[:3] == ("high", True, True)  # training's own setting, back after the pass
    mcalls = _spy_collapse_table(monkeypatch, measure_mod)
    run_in_process(tmp_path / "m", *TINY, "task=measure", "train.tf32=true",
                   f"arch.checkpoint={tmp_path / CHECKPOINT_FILE}")  # fmt: skip
    for seen in (*calls, *mcalls):
        assert seen["tf32"] == ("highest", False, False) and not seen["autocast"]
        assert seen["dtypes"] == {torch.float32}
    assert len(calls) == 1 and len(mcalls) == 1


# ---------------------------------------------------------------------- 4. GPU memory
def _feature_bytes(cfg, n: int) -> int:
    """N·(4·Σd + 8): the digits FC net studies blocks + 1 layers of ``arch.width``."""
    return n * (4 * cfg.arch.width * (cfg.arch.blocks + 1) + 8)


@pytest.mark.parametrize("fits", [True, False])
def test_caching_is_decided_before_pass_1(tmp_path, monkeypatch, fits):
    """The tracker gets the cache budget only when N·Σd·4 (+ labels) fits it, else 0: it
    never fills a cache it will drop."""
    from pfc_sweeps.data.builtin import load_dataset

    cfg = _cfg("train.epochs=1")
    n = len(load_dataset("digits").train_y)
    need = _feature_bytes(cfg, n)
    budget = need if fits else need - 1
    cfg.train.cache_gb = budget / 2**30
    calls = _spy_collapse_table(monkeypatch, train_mod)
    trainer = _trainer(cfg, tmp_path)
    trainer.run_epoch(1)
    trainer.close()
    assert trainer.cache_bytes == budget
    assert [c["cache_bytes"] for c in calls] == [budget if fits else 0]


def test_on_cuda_the_free_gpu_memory_bounds_the_cache(monkeypatch):
    from pfc_sweeps.data.builtin import load_dataset
    from pfc_sweeps.nets.resnets import build_model

    data = load_dataset("digits")
    model = build_model("fc", data.in_shape, 10, width=16, blocks=2)
    need = len(data.train_y) * (4 * 16 * 3 + 8)
    gpu = torch.device("cuda", 0)
    idle = 1000
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 5000 + idle)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 5000)
    for free, want in [(2 * need, 2**40), (need, 0)]:  # 3/4 of the free memory must hold it
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d, f=free: (f - idle, 2**40))
        assert accel.metric_cache_bytes(model, data, "train", 2**40, gpu) == want
    assert accel.metric_cache_bytes(model, data, "train", 0, torch.device("cpu")) == 0


def test_module_data_is_read_on_the_cpu_into_one_tensor_and_moved_once(monkeypatch):
    from pfc_sweeps.data import module as module_mod
    from pfc_sweeps.data.bundles import StreamBundle

    ds = torch.utils.data.TensorDataset(torch.randn(1030, 3, 4, 4), torch.arange(1030) % 7)
    stream = StreamBundle(ds, ds, 7, (3, 4, 4), "t", torch.device("meta"))
    devices = []
    real = module_mod.StreamBundle.batches

    def batches(self, *args):
        devices.append(self.device)
        return real(self, *args)

    monkeypatch.setattr(module_mod.StreamBundle, "batches", batches)
    x, y = module_mod._materialise(stream, "train", batch=512)
    assert devices == [torch.device("cpu")]  # read on the CPU
    assert x.is_meta and y.is_meta and x.shape == (1030, 3, 4, 4)
    stream.device = torch.device("cpu")
    x, y = module_mod._materialise(stream, "train", batch=512)
    assert torch.equal(x, ds.tensors[0]) and torch.equal(y, ds.tensors[1])


def test_local_launcher_gives_every_job_all_gpus_of_the_machine():
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", ["hydra/launcher=local"], return_hydra_config=True)
    assert cfg.hydra.launcher.gpus_per_node == torch.cuda.device_count()


def test_a_local_sweep_job_takes_gpu_num_mod_count_and_holds_it(tmp_path, monkeypatch):
    """Job 3 of a local sweep on a 2-GPU machine trains on cuda:1 and holds its lock: another
    process cannot take GPU 1 (it would wait), GPU 0 is free."""
    import subprocess
    import sys

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from pfc_sweeps.jobs import devices

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", [f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode, cfg.hydra.job.num = RunMode.MULTIRUN, 3
    HydraConfig.instance().set_config(cfg)
    current = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    gpu = torch.device("cuda")
    assert devices.local_job_device(gpu) == gpu  # not a local-launcher job: unchanged
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    try:
        assert devices.local_job_device(gpu) == torch.device("cuda", 1) and current == [1]
        assert devices.local_job_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
        probe = (
            "import sys; from pathlib import Path; from pfc_sweeps.jobs.devices import "
            "claim_gpu_slot as c; print(c(Path(sys.argv[1]), 1, wait=False), "
            "c(Path(sys.argv[1]), 0, wait=False))"
        )
        out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / ".submitit")],
                             capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
        assert out.stdout.split() == ["False", "True"], out.stderr
    finally:
        devices._HELD.pop(tmp_path / ".submitit" / "gpu-1.lock").close()


# ------------------------------------------------------- 9. fp16: the scaler skips steps
def _scaled_trainer(cfg, out: Path, monkeypatch, bad_batches, scaler: bool):
    """A Trainer whose loss is inf at the given batches of every epoch, with a CPU gradient
    scaler (fp16 itself needs CUDA) or without one."""

    def accelerator(tr, dev):
        acc = accel.Accelerator(tr, dev)
        if scaler:
            acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        return acc

    monkeypatch.setattr(train_mod, "Accelerator", accelerator)
    real, seen = train_mod.loss_fn, []

    def loss_fn(name, logits, y):
        seen.append(len(y))
        loss = real(name, logits, y)
        return loss * math.inf if logits.requires_grad and len(seen) in bad_batches else loss

    monkeypatch.setattr(train_mod, "loss_fn", loss_fn)
    return _trainer(cfg, out), seen


def test_fp16_scaler_skips_a_non_finite_step_and_the_epoch_goes_on(tmp_path, monkeypatch):
    cfg = _cfg("train.epochs=1", "train.batch_size=256")
    trainer, seen = _scaled_trainer(cfg, tmp_path, monkeypatch, {2}, scaler=True)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    loss, _ = trainer._train_epoch()
    assert trainer.accel.scaler.get_scale() == 2.0**9  # the inf step was skipped once
    assert math.isfinite(loss) and len(seen) >= 3  # the batches after the inf one counted
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())


def test_divergence_stops_when_the_scaler_cannot_recover_or_there_is_none(tmp_path, monkeypatch):
    cfg = _cfg("train.epochs=1", "train.batch_size=256")
    every = set(range(1, 100))  # every training batch is inf: nothing to recover
    trainer, _ = _scaled_trainer(cfg, tmp_path / "a", monkeypatch, every, scaler=True)
    with pytest.raises(Diverged, match="diverged at epoch 1"):
        trainer._epoch_scalars(1)
    trainer, _ = _scaled_trainer(cfg, tmp_path / "b", monkeypatch, {2}, scaler=False)
    with pytest.raises(Diverged, match="diverged at epoch 1"):  # fp32: one inf is the end
        trainer._epoch_scalars(1)


def test_epoch_loss_skips_only_with_a_scaler():
    losses = [torch.tensor(1.0), torch.tensor(math.inf), torch.tensor(3.0)]
    sizes = [10, 10, 30]
    skip = accel.EpochLoss(torch.device("cpu"), skip_nonfinite=True)
    keep = accel.EpochLoss(torch.device("cpu"), skip_nonfinite=False)
    for loss, n in zip(losses, sizes, strict=True):
        skip.add(loss, n)
        keep.add(loss, n)
    assert skip.mean() == (1.0 * 10 + 3.0 * 30) / 40 and int(skip.skipped) == 1
    assert keep.mean() == math.inf
    assert math.isnan(accel.EpochLoss(torch.device("cpu"), True).mean())


def test_torch_lower_bound_has_the_apis_used():
    """pyproject's torch bound is 2.3: torch.amp.GradScaler (CUDA and CPU) came with it."""
    text = (REPO / "pyproject.toml").read_text()
    assert '"torch>=2.3"' in text and '"torchvision>=0.18"' in text
    low = dict(
        line.split("==") for line in (REPO / "constraints-low.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )  # fmt: skip
    assert low["torch"] == "2.3.1" and low["torchvision"] == "0.18.1"
    assert torch.amp.GradScaler("cpu").is_enabled()


# ------------------------------------------------------------------- 8. device_check.sh
def _bench(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_device_options_rows_are_compared_within_the_bound(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "device_options.py"), "--tiny", "--device",
         "cpu", "--steps", "2", "--n", "120", "--options", "fp32,bf16,channels_last,tf32,fp16"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "fp16: skipped (needs CUDA)" in out.stdout
    assert out.stdout.splitlines()[-1].startswith("OPTIONS ok: metric rows of every option within")
    rows = [line.split() for line in out.stdout.splitlines() if line.split()[-1:] == ["True"]]
    assert [r[0] for r in rows] == ["fp32", "bf16", "channels_last", "tf32"]
    # the comparison can fail: one row off by 2e-5 relative
    diff = _bench("device_options").max_rel_diff
    a = pd.Series([1.0, 2.0, math.nan, 0.0])
    assert diff(a, a.copy()) == 0.0
    assert diff(a, pd.Series([1.0, 2.0 * (1 + 2e-5), math.nan, 0.0])) == pytest.approx(
        2e-5, rel=1e-3
    )
    assert diff(a, pd.Series([1.0, 2.0, 1.0, 0.0])) == math.inf  # NaN against a number


def test_every_device_check_step_is_documented():
    import re

    script = (REPO / "benchmarks" / "device_check.sh").read_text()
    steps = re.findall(r"^step ([\w-]+) (\d+) ", script, flags=re.M)
    doc = (REPO / "docs" / "gpu.md").read_text()
    documented = re.findall(r"^\| `([\w-]+)` \| (\d+) s \|", doc, flags=re.M)
    assert len(steps) >= 9 and steps == documented


# ----------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_resume_on_cuda_restores_the_cuda_rng_state(tmp_path):
    cfg = _cfg("train.epochs=2", "train.device=cuda")
    first = _trainer(cfg, tmp_path)
    first.run_epoch(1)
    first.close()
    saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)
    assert isinstance(saved["rng"]["cuda"], torch.Tensor)  # the job's own GPU only
    torch.cuda.manual_seed(123)
    second = _trainer(cfg, tmp_path)
    assert second.start_epoch == 2
    assert torch.equal(torch.cuda.get_rng_state(second.device), saved["rng"]["cuda"])
    assert next(second.model.parameters()).is_cuda
    second.run_epoch(2)
    second.close()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_cache_decision_reads_the_free_memory(tmp_path):
    from pfc_sweeps.data.builtin import load_dataset
    from pfc_sweeps.nets.resnets import build_model

    gpu = torch.device("cuda")
    data = load_dataset("digits", device=gpu)
    model = build_model("fc", data.in_shape, 10, width=16, blocks=2).to(gpu)
    free, _ = torch.cuda.mem_get_info(gpu)
    per_sample = 4 * 16 * 3 + 8

    class Sized:  # the digits batches, with N as if the set were that big
        def __init__(self, n: int) -> None:
            self.n = n

        def size(self, split: str) -> int:
            return self.n

        def batches(self, *args):
            return data.batches(*args)

    budget = 4 * free  # more than the GPU has: the free memory decides
    fits, too_big = Sized(free // 2 // per_sample), Sized(free // per_sample)
    assert accel.metric_cache_bytes(model, fits, "train", budget, gpu) == budget
    assert accel.metric_cache_bytes(model, too_big, "train", budget, gpu) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_streamed_module_data_on_cuda_gives_the_in_memory_batches():
    """The pinned-memory DataLoader path (train.data_gb exceeded) and the in-memory path
    give the same batches on CUDA."""
    from pfc_sweeps.data.bundles import StreamBundle
    from pfc_sweeps.data.module import _materialise

    ds = torch.utils.data.TensorDataset(torch.randn(700, 3, 8, 8), torch.arange(700) % 5)
    gpu = torch.device("cuda")
    stream = StreamBundle(ds, ds, 5, (3, 8, 8), "t", gpu, num_workers=2)
    x, y = _materialise(stream, "train")
    assert x.is_cuda and torch.equal(x.cpu(), ds.tensors[0])
    order = torch.randperm(700, generator=torch.Generator().manual_seed(0))
    for (xs, ys), (xm, ym) in zip(stream.batches("train", order, 128),
                                  ((x[i], y[i]) for i in order.to(gpu).split(128)), strict=True):  # fmt: skip
        assert torch.equal(xs, xm) and torch.equal(ys, ym)


#: The FC net and a conv net (digits' 8x8 images) for the kill-and-resume identity check.
RESUME_ARCHS = {
    "fc": ["arch.width=128", "arch.blocks=6"],
    "conv": ["arch.kind=conv", "arch.stages=[[16,8,1],[32,4,3]]"],
}


def kill_and_resume(tmp_path: Path, device: str, arch: str, epochs: int = 30) -> int:
    """An uninterrupted run, and a run SIGKILLed after its 3rd checkpoint then rerun: their
    tables must be identical (train.deterministic=true). Returns the epoch killed at."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import launch

    args = ["logger=none", f"train.epochs={epochs}", "train.geodesic_points=5",
            f"train.device={device}", "train.deterministic=true", *RESUME_ARCHS[arch]]  # fmt: skip
    ref, out = tmp_path / "ref", tmp_path / "killed"
    p = launch(*args, f"hydra.run.dir={ref}")
    assert p.returncode == 0, p.stderr
    proc = subprocess.Popen([sys.executable, str(REPO / "launch.py"), *args,
                             f"hydra.run.dir={out}"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    ckpt_file, deadline = out / CHECKPOINT_FILE, time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt_file.exists() and torch.load(ckpt_file, weights_only=False)["epoch"] >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(ckpt_file, weights_only=False)["epoch"]
    assert killed_at < epochs and not (out / "done").exists()
    p = launch(*args, f"hydra.run.dir={out}")
    assert p.returncode == 0 and "Resuming" in p.stdout, p.stderr

    def frame(job: Path):
        df = read_results(job)[0].drop(columns=["run_id", "sweep_id"])
        return df.sort_values(["epoch", "metric", "layer", "rel_pos"]).reset_index(drop=True)

    pd.testing.assert_frame_equal(frame(ref), frame(out), check_exact=True)
    return killed_at


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("arch", sorted(RESUME_ARCHS))
def test_sigkill_resume_on_cuda_is_identical(tmp_path, arch):
    kill_and_resume(tmp_path, "cuda", arch)
