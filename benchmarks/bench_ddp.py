"""One process vs several ranks (issue 17): digits epochs side by side, memory per rank, agreement.

Runs the same digits training job (``launch.py``) as one process and under ``torchrun`` with
``--nproc`` ranks, in one go, and prints: the median epoch time of each and their ratio, the
peak resident memory (VmHWM) of the single process and of each rank, and the largest relative
difference of the last epoch's metrics (DDP training: within 1e-4). On CPU the ranks use gloo
and share the cores, so they are not faster: the point is correctness; on GPUs (``--device
cuda``, NCCL) each rank has its own GPU.

    python benchmarks/bench_ddp.py [--nproc 2] [--epochs 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
EPOCH = re.compile(r"epoch \d+/\d+ .*\(([0-9.]+)s\)")


def _descendants(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(proc.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _hwm(pid: int) -> tuple[str, int] | None:
    """(role, peak RSS in MiB) of a python process: 'rank N', 'agent' or 'process'."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    kb = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) if "VmHWM" in status else 0
    rank = [e[5:].decode() for e in env if e.startswith(b"RANK=")]
    return (f"rank {rank[0]}" if rank else "process"), kb // 1024


def run(cmd: list[str], out: Path) -> tuple[list[float], dict[str, int], pd.DataFrame]:
    """Run one job; its epoch times, peak memory per role, and its table."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    p = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peaks: dict[int, tuple[str, int]] = {}

    def sample() -> None:
        while p.poll() is None:
            for pid in _descendants(p.pid):
                got = _hwm(pid)
                if got is not None:
                    peaks[pid] = got
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    text = p.communicate()[0]
    t.join()
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{text[-2000:]}")
    mem: dict[str, int] = {}
    for pid, (role, mb) in peaks.items():
        role = "agent" if pid == p.pid and "-m" in cmd[1:3] else role
        mem[role] = max(mem.get(role, 0), mb)
    return [float(m) for m in EPOCH.findall(text)], mem, pd.read_parquet(out / "metrics.parquet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    args = [f"train.epochs={a.epochs}", "logger=none", f"train.device={a.device}"]
    args += ["arch.width=128", "arch.blocks=10"]  # the digits default net
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        launch = [sys.executable, str(REPO / "launch.py")]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        torchrun += ["--nproc_per_node", str(a.nproc), str(REPO / "launch.py")]
        t1, m1, d1 = run([*launch, *args, f"hydra.run.dir={one}"], one)
        tn, mn, dn = run([*torchrun, *args, f"hydra.run.dir={many}"], many)
    keys = ["epoch", "split", "layer", "metric"]
    m = d1.merge(dn, on=keys)
    rel = (m.value_x - m.value_y).abs() / m.value_x.abs().clip(lower=1e-12)
    loss = rel[m.metric == "train_loss"].max()
    real = rel[(m.epoch == m.epoch.max()) & m.metric.isin(["pfc1", "pfc2", "nc1", "nc2"])].max()
    med1, medn = statistics.median(t1[1:] or t1), statistics.median(tn[1:] or tn)
    print(f"device {a.device}, digits 128 x 10 blocks, {a.epochs} epochs (median of epochs 2..)")
    print(
        f"epoch time: 1 process {med1:.3f}s, {a.nproc} ranks {medn:.3f}s, ratio {medn / med1:.2f}"
    )
    ranks = {k: v for k, v in mn.items() if k.startswith("rank")}
    print(f"peak RSS MiB: 1 process {m1.get('process')}; ranks {ranks}; agent {mn.get('agent')}")
    extra = max(ranks.values()) - m1.get("process", 0)
    print(f"extra memory per rank vs 1 process: {extra} MiB (each rank is a whole process)")
    # float rounding (the order of the sums) grows over a few epochs of this deep net: compare
    # with a single process on 2 threads, which differs from 1 thread by as much
    print(
        f"max rel diff vs 1 process: train loss curve {loss:.3g}, last pfc1/pfc2/nc1/nc2 {real:.3g}"
    )


if __name__ == "__main__":
    main()
