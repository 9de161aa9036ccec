"""Training speed options (pfc_sweeps.jobs.accel): each off by default, each checked where it runs."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pfc_sweeps.config import Config, ConfigError, TrainConfig, validate
from pfc_sweeps.jobs.accel import Accelerator, prepare_model
from pfc_sweeps.nets.resnets import build_model

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


def opts(**kw) -> TrainConfig:
    return TrainConfig(**kw)


def conv_net(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("conv", (1, 8, 8), 3, stages=[[4, 8, 1], [8, 4, 1]], block="preact_bn")


def train_steps(model, acc: Accelerator, steps: int = 3, seed: int = 0) -> list[float]:
    """A few SGD steps on fixed random data; the losses."""
    gen = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    x = torch.randn(16, *model_in_shape(model), generator=gen).to(dev)
    y = torch.randint(0, 3, (16,), generator=gen).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    losses = []
    for _ in range(steps):
        with acc.autocast():
            logits = model.forward_logits(acc.inputs(x))
            loss = torch.nn.functional.cross_entropy(logits, y)
        acc.step(loss, opt)
        losses.append(float(loss.detach()))
    return losses


def model_in_shape(model) -> tuple[int, ...]:
    return (1, 8, 8) if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()) else (12,)


def test_defaults_are_off():
    tr = TrainConfig()
    assert (tr.precision, tr.channels_last, tr.tf32, tr.compile) == ("fp32", False, False, False)
    acc = Accelerator(tr, CPU)
    assert acc.dtype is None and acc.scaler is None
    x = torch.randn(2, 1, 4, 4)
    assert acc.inputs(x) is x


def test_bf16_autocast_runs_the_forward_in_bf16_on_cpu():
    model = conv_net()
    seen = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ref = train_steps(copy.deepcopy(model), Accelerator(opts(), CPU))
    seen.clear()
    got = train_steps(model, Accelerator(opts(precision="bf16"), CPU))
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights fp32
    # same optimisation up to bf16 rounding (8-bit mantissa)
    assert got == pytest.approx(ref, rel=0.05)


def test_fp16_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: fp16 is allowed")
    with pytest.raises(ValueError, match=r"fp16.*CUDA"):
        Accelerator(opts(precision="fp16"), CPU)
    cfg = OmegaConf.structured(Config)
    cfg.train.precision = "fp16"
    with pytest.raises(ConfigError, match=r"train\.precision='fp16'.*CUDA"):
        validate(cfg)
    cfg.train.precision = "fp64"
    with pytest.raises(ConfigError, match=r"train\.precision.*fp32, bf16, fp16"):
        validate(cfg)


def test_channels_last_conv_matches_default_layout():
    ref_model, model = conv_net(), conv_net()
    model = prepare_model(model, opts(channels_last=True), CPU)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    acc = Accelerator(opts(channels_last=True), CPU)
    assert acc.inputs(torch.randn(2, 1, 8, 8)).is_contiguous(memory_format=torch.channels_last)
    got = train_steps(model, acc)
    ref = train_steps(ref_model, Accelerator(opts(), CPU))
    assert got == pytest.approx(ref, rel=1e-4)  # same maths, another memory layout


def test_tf32_sets_the_matmul_flags():
    before = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
    try:
        prepare_model(conv_net(), opts(tf32=True), CPU)
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cuda.matmul.allow_tf32 = before[1]


def test_tracker_ignores_tf32_and_autocast():
    """The metric pass stays float32/float64 exact when training enabled TF32 or autocast."""
    from pfc_sweeps.collapse.tracker import CollapseTracker

    gen = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    hs = [torch.randn(3, 5, generator=gen)[y] + 0.3 * torch.randn(60, 5, generator=gen)]
    hs.append(hs[0] * 1.5 + 0.1 * torch.randn(60, 5, generator=gen))

    def run():
        tr = CollapseTracker(3)
        tr.update(hs, y)
        tr.end_pass()
        return tr.compute().table.value.tolist()

    want = run()
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = run()
        assert torch.get_float32_matmul_precision() == "medium"  # restored after the pass
    finally:
        torch.set_float32_matmul_precision(before)
    assert got == want


@pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("PFC_TEST_COMPILE") == "1"),
    reason="torch.compile on CPU builds C++ kernels for minutes; set PFC_TEST_COMPILE=1",
)
def test_compile_keeps_state_dict_and_results():
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    ref = build_model("fc", (12,), 3, width=8, blocks=2).to(dev)
    model = copy.deepcopy(ref)
    model = prepare_model(model, opts(compile=True), dev)
    assert list(model.state_dict()) == list(ref.state_dict())  # checkpoints interchangeable
    got = train_steps(model, Accelerator(opts(), CPU))
    want = train_steps(ref, Accelerator(opts(), CPU))
    assert got == pytest.approx(want, rel=1e-5)


def _scaled(init_scale: float = 2.0**10) -> Accelerator:
    """An fp32 Accelerator with a CPU gradient scaler (fp16 itself needs CUDA)."""
    acc = Accelerator(opts(), CPU)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
    return acc


def test_scaler_state_round_trips():
    """The loss scale after an overflow (halved) and the growth tracker survive state_dict;
    a fresh scaler would start again at init_scale."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = _scaled()
    x = torch.randn(4, 3)
    acc.step(model(x).sum() * math.inf, opt)  # inf gradients: step skipped, scale halved
    acc.step(model(x).sum(), opt)  # a good step: growth tracker 1
    state = acc.state_dict()
    assert state["scaler"]["scale"] == 2.0**9 and state["scaler"]["_growth_tracker"] == 1
    back = _scaled()
    back.load_state_dict(state)
    assert back.scaler.get_scale() == 2.0**9 and back.scaler.state_dict() == state["scaler"]
    fresh = _scaled()
    fresh.load_state_dict({})  # a checkpoint from before the scaler was saved
    assert fresh.scaler.get_scale() == 2.0**10
    assert Accelerator(opts(), CPU).state_dict() == {}  # no scaler: nothing to save


def test_trainer_checkpoint_keeps_the_loss_scale(tmp_path, monkeypatch):
    """A resumed fp16 job continues with the loss scale it had, not the initial one."""
    from hydra import compose, initialize_config_dir

    from pfc_sweeps.config import register_configs
    from pfc_sweeps.jobs import train as train_mod
    from pfc_sweeps.results.loggers import NullLogger
    from pfc_sweeps.results.sink import ResultsSink

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = validate(compose("config", ["train.epochs=2", "arch.width=16", "arch.blocks=2"]))
    monkeypatch.setattr(train_mod, "Accelerator", lambda tr, dev: _scaled())
    meta = dict(run_id="r", sweep_id="s", task="train", dataset="digits", arch="digits",
                loss="ce", seed=0, lam=math.nan, lam_w=math.nan)  # fmt: skip

    def trainer():
        return train_mod.Trainer(cfg, tmp_path, ResultsSink(tmp_path, meta, {}), NullLogger())

    first = trainer()
    first.accel.scaler.load_state_dict({**first.accel.scaler.state_dict(), "scale": 123.0})
    first._save(1)
    first.close()
    second = trainer()
    assert second.start_epoch == 2 and second.accel.scaler.get_scale() == 123.0
