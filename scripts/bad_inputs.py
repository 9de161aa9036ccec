"""Try launch.py with bad inputs and print a table: exit code, first stderr line, cleanliness.

    python scripts/bad_inputs.py [--out table.md] [--only SUBSTRING]

A case is clean when launch.py exits non-zero, stderr holds one line that names the key or
path, and the job dir holds nothing new but Hydra's ``launch.log`` and ``.hydra/`` (and
``error.txt`` for sweep jobs): no results, checkpoint, run id, fingerprint or W&B run, and
no file that existed before was changed. Runs about 75 jobs (several minutes on a laptop).
The cases of a user's own model and data (``arch=module``, ``dataset=module``) use
``tests/helpers/user_model.py``, ``tests/helpers/user_data.py`` and ImageFolders of real PNG files.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "helpers"))

TINY = ["arch.width=16", "arch.blocks=2", "train.geodesic_points=3", "train.epochs=2"]
SUR = ["task=mufm", "surrogate.steps=40", "surrogate.log_every=20"]
HYDRA_OWN = ("launch.log", ".hydra/", "multirun.yaml")


@dataclass
class Case:
    name: str
    args: list[str]
    names: str  # the key or path the first line must name ("{dir}" / "{root}" are filled in)
    setup: Callable[[Path], None] | None = None
    sweep: bool = False
    allowed: tuple[str, ...] = field(default_factory=tuple)  # files a failure may leave
    sub: str = ""  # run in <job dir>/<sub> (e.g. under a file)
    recovers: bool = False  # the right outcome is a normal run (the input is repaired)


def _snapshot(d: Path) -> dict[str, bytes]:
    if not d.is_dir():
        return {}
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _run(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline", **(env_extra or {})}
    env.pop("WANDB_DIR", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(REPO / "tests" / "helpers")]
    )  # user_model, user_data
    cmd = [sys.executable, str(REPO / "launch.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


# ---------------------------------------------------------------------------- setups
def _train_done(d: Path) -> None:
    assert _run([*TINY, "logger=none", f"hydra.run.dir={d}"]).returncode == 0


def _ckpt(content: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        _train_done(d)
        ck = d / "checkpoint.pt"
        data = content(ck.read_bytes())
        for f in ("done", "metrics.parquet", "fingerprint.json", "run_id"):
            (d / f).unlink()
        ck.write_bytes(data)

    return setup


def _corrupt(name: str, keep_done: bool = False) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        _train_done(d)
        if not keep_done:
            (d / "done").unlink()
        (d / name).write_bytes(b"garbage" * 10)

    return setup


def _fake(name: str, truncate: str | None) -> Callable[[Path], None]:
    import fakedata

    def setup(d: Path) -> None:
        root = d.parent / "data"
        fakedata.write(name, root, n_per_class=2)
        if truncate:
            for p in root.rglob(truncate):
                p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])

    return setup


def _file(d: Path) -> None:
    d.parent.mkdir(parents=True, exist_ok=True)
    d.write_text("a file")


def _locked(d: Path) -> None:
    from pfc_sweeps.jobs.jobdir import JobLock

    d.mkdir(parents=True)
    _locked.lock = JobLock(d).acquire()  # held by this script while the case runs


CASES = [
    Case("unknown key (+)", ["+train.epoch=5"], "train.epochs"),
    Case("unknown key", ["train.epoch=5"], "train.epochs"),
    Case("unknown key, other group", ["optim.lrr=0.1"], "optim.lr"),
    Case("unknown top-level key", ["+foo=1"], "foo"),
    Case("old key name", ["dataset.n_per_class=5"], "dataset.n_per_class"),
    Case("cache_gb inf", ["train.cache_gb=inf"], "train.cache_gb"),
    Case("weight_decay inf", ["optim.weight_decay=inf"], "optim.weight_decay"),
    Case("momentum nan", ["optim.momentum=nan"], "optim.momentum"),
    Case("lr negative", ["optim.lr=-1"], "optim.lr"),
    Case("lr nan", ["optim.lr=nan"], "optim.lr"),
    Case("gamma 0", ["optim.gamma=0"], "optim.gamma"),
    Case("decay_at > 1", ["optim.decay_at=[1.5]"], "optim.decay_at[0]"),
    Case("lam inf", [*SUR, "lam.lam=inf"], "lam.lam"),
    Case("lam grid nan", [*SUR, "lam.grid=[0.1,nan]"], "lam.grid[1]"),
    Case("surrogate lr inf", [*SUR, "surrogate.lr=inf"], "surrogate.lr"),
    Case("sigma nan", ["dataset=gaussian", "gaussian.sigma=nan"], "gaussian.sigma"),
    Case("dim < K-1", [*SUR, "gaussian.dim=2"], "gaussian.dim"),
    Case("subset too large", ["dataset.subset_per_class=100000"], "dataset.subset_per_class"),
    Case("subset 0", ["dataset.subset_per_class=0"], "dataset.subset_per_class"),
    Case("cuda without CUDA", ["train.device=cuda"], "train.device"),
    Case("unknown device", ["train.device=tpu"], "train.device"),
    Case("old task name", ["task.name=mufm"], "task.name"),
    Case("unknown model", ["task=mufm", "task.models=[bogus]"], "task.models[0]"),
    Case("unknown data set", ["dataset.name=imagenet"], "dataset.name"),
    Case("bad conv stage", ["dataset=cifar10", "arch.stages=[[64,4]]"], "arch.stages[0]"),
    Case("negative seed", ["seed=-1"], "seed"),
    Case("zero epochs", ["train.epochs=0"], "train.epochs"),
    Case("wrong type (Hydra)", ["seed=x"], "seed"),
    Case("wrong type float (Hydra)", ["lam.lam=abc"], "lam.lam"),
    Case("unknown group option (Hydra)", ["dataset=nosuch"], "dataset"),
    Case("run dir is a file", [], "{dir}", setup=_file),
    Case("run dir under a file", [], "{dir}", setup=_file, sub="sub"),
    Case("sweep dir is a file", ["seed=0,1"], "{dir}", setup=_file, sweep=True),
    Case("read-only output dir", [], "/tmp/pfc-bad-inputs-ro"),
    Case("garbage checkpoint", [], "{dir}/checkpoint.pt", setup=_ckpt(lambda b: os.urandom(999))),
    Case(
        "truncated checkpoint", [], "{dir}/checkpoint.pt", setup=_ckpt(lambda b: b[: len(b) // 2])
    ),
    Case("empty checkpoint", [], "{dir}/checkpoint.pt", setup=_ckpt(lambda b: b"")),
    Case("corrupt fingerprint", [], "{dir}/fingerprint.json", setup=_corrupt("fingerprint.json")),
    Case("corrupt parquet, not done", [], "", setup=_corrupt("metrics.parquet"), recovers=True),
    Case("changed epochs on a done dir", ["train.epochs=3"], "train.epochs", setup=_train_done),
    Case("other seed on a done dir", ["seed=1"], "seed", setup=_train_done),
    Case("dir in use by another process", [], "{dir}", setup=_locked),
    Case(
        "missing data set",
        ["dataset=cifar10", "dataset.download=false", "dataset.root={root}"],
        "{root}",
    ),
    Case(
        "truncated mnist .gz",
        ["dataset=mnist", "dataset.download=false", "dataset.root={root}"],
        "{root}",
        setup=_fake("mnist", "train-images*.gz"),
    ),
    Case(
        "truncated cifar10 batch",
        ["dataset=cifar10", "dataset.download=false", "dataset.root={root}"],
        "{root}",
        setup=_fake("cifar10", "data_batch_1"),
    ),
    Case(
        "sweep, two missing data sets",
        ["dataset=mnist,cifar100", "dataset.download=false", "dataset.root={root}"],
        "{root}",
        sweep=True,
        allowed=("error.txt",),
    ),
    Case(
        "training diverges (lr 1e6)",
        ["optim.lr=1e6"],
        "optim.lr",
        allowed=("metrics.parquet", "run_id", "fingerprint.json", "wandb/", "error.txt"),
    ),
]


# ---------------------------------------------------------------- a user's own model and data
OWN = ["train.epochs=1", "train.geodesic_points=3"]
MODEL = "{_target_: user_model.%s, num_classes: null, %s}"
MIXER = ["arch=module", "arch.model=" + MODEL % ("Mixer", "in_channels: null, width: 8")]
MIXER += ["arch.classifier=head"]
TWICE = ["arch=module", "arch.model=" + MODEL % ("Twice", "in_shape: null"), "arch.classifier=head"]
MIXED = [*MIXER, "arch.layers=[conv,proj,blocks.*]", *OWN]
FOLDER = "{_target_: torchvision.datasets.ImageFolder, root: {root}/%s, transform: {_target_: torchvision.transforms.ToTensor}}"


def _digits(train: str = "", test: str = "") -> list[str]:
    node = "{_target_: user_data.Digits, train: %s%s}"
    return ["dataset=module", f"dataset.train={node % ('true', train)}",
            f"dataset.test={node % ('false', test)}", *MIXED]  # fmt: skip


def _folder(change: Callable[[Path], None]) -> Callable[[Path], None]:
    import fakedata

    def setup(d: Path) -> None:
        root = d.parent / "data"
        fakedata.write_image_folder(root, k=3, n_per_class=10, size=8)
        change(root)

    return setup


def _truncate_png(root: Path) -> None:
    bad = root / "train" / "class1" / "4.png"
    bad.write_bytes(bad.read_bytes()[:60])


def _resize_png(root: Path) -> None:
    from PIL import Image

    Image.new("RGB", (9, 8)).save(root / "test" / "class2" / "0.png")


FOLDERS = ["dataset=module", f"dataset.train={FOLDER % 'train'}", f"dataset.test={FOLDER % 'test'}"]
CASES += [
    Case("layer listed twice", [*MIXER, "arch.layers=[conv,proj,proj]", *OWN], "'proj'"),
    Case("layer listed twice (glob)", [*MIXER, "arch.layers=[conv,blocks.*,blocks.1]", *OWN], "'blocks.1'"),
    Case("studied module runs twice", [*TWICE, "arch.layers=[stem,shared]", *OWN], "'shared'"),
    Case("studied module never runs", [*TWICE, "arch.layers=[stem,spare]", *OWN], "'spare'"),
    Case("layers out of forward order", [*MIXER, "arch.layers=[conv,blocks.1,blocks.0]", *OWN], "'blocks.0'"),
    Case("model fails on the data's shape",
         ["arch=module", "arch.model=" + MODEL % ("Twice", "in_shape: [1, 9, 9]"),
          "arch.classifier=head", "arch.layers=[stem,shared]", *OWN], "arch.model"),
    Case("NaN pixel", _digits(", defect: nan_pixel"), "dataset.train item 7"),
    Case("inf pixel (targets)", _digits(", defect: inf_pixel, targets: true"), "dataset.train item 7"),
    Case("NaN pixel, streamed", [*_digits(", defect: nan_pixel, at: 250, targets: true"), "train.data_gb=0"], "dataset.train item 250"),
    Case("NaN pixel, streamed, 2 workers", [*_digits(", defect: nan_pixel, at: 250, targets: true"), "train.data_gb=0", "train.num_workers=2"], "dataset.train item 250"),
    Case("NaN pixel in test, streamed", [*_digits("", ", defect: nan_pixel"), "train.data_gb=0"], "dataset.test item 7"),
    Case("negative label", _digits(", defect: negative"), "dataset.train item 7"),
    Case("float label 2.5 (targets)", _digits(", defect: float, targets: true"), "dataset.train item 7"),
    Case("text label", _digits(", defect: text"), "dataset.train item 7"),
    Case("label >= len(classes)", _digits(", defect: big, classes: true"), "dataset.train item 7"),
    Case("train lacks a class", _digits(", defect: no9, classes: true"), "class(es) 9"),
    Case("test has a class train lacks", _digits(", defect: no9", ", targets: true"), "class(es) 9"),
    Case("samples of two shapes", _digits(", defect: shape"), "dataset.train item 7"),
    Case("empty train split", _digits(", defect: empty"), "dataset.train"),
    Case("empty test split", _digits("", ", defect: empty"), "dataset.test"),
    Case("single-class train split", _digits(", defect: single"), "dataset.train"),
    Case("single-class test split", _digits("", ", defect: single, targets: true"), "dataset.test"),
    Case("item raises when read", _digits(", defect: raises"), "dataset.train item 7"),
    Case("ImageFolder: truncated PNG", [*FOLDERS, *MIXED], "{root}/train/class1/4.png", setup=_folder(_truncate_png)),
    Case("ImageFolder: PNG of another size", [*FOLDERS, *MIXED], "{root}/test/class2/0.png", setup=_folder(_resize_png)),
    Case("ImageFolder: test class not in train", [*FOLDERS, *MIXED], "class9",
         setup=_folder(lambda r: (r / "test" / "class2").rename(r / "test" / "class9"))),
    Case("run dir name too long", [], "{dir}", sub="x" * 300),
    Case("sweep dir name too long", ["seed=0,1"], "{dir}", sweep=True, sub="y" * 300),
    Case("run dir path too long", [], "{dir}", sub="/".join(["z" * 200] * 25)),
]  # fmt: skip


#: How the table shows the long arguments of the cases (a legend follows the table).
ABBREV = [
    (" ".join(FOLDERS), "$FOLDERS"),
    (" ".join(MIXER), "$MIXER"),
    (" ".join(TWICE[:2]), "$TWICE"),
    ("arch.layers=[conv,proj,blocks.*] " + " ".join(OWN), "$LAYERS"),
]


def _new_files(before: dict[str, bytes], after: dict[str, bytes], allowed) -> list[str]:
    bad = []
    for name, data in after.items():
        if name.startswith(HYDRA_OWN) or "/.hydra/" in name or name.endswith("launch.log"):
            continue
        if name in before and before[name] == data:
            continue
        if any(name.startswith(a) or f"/{a}" in name for a in (*allowed, ".errors/")):
            continue
        bad.append(name)
    return bad


def run_case(case: Case, base: Path) -> dict:
    d = base / "job"
    root = base / "data"
    if case.name.startswith("read-only"):
        d = Path("/tmp/pfc-bad-inputs-ro")
        d.mkdir(exist_ok=True)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)]).returncode:
            return {"rc": "-", "first": "skipped (needs root to mount a read-only tmpfs)"}
    if case.setup:
        case.setup(d)
    root.mkdir(parents=True, exist_ok=True)
    before = _snapshot(d) if d.is_dir() else {}
    args = [a.replace("{root}", str(root)) for a in case.args]
    target_dir = d / case.sub if case.sub else d
    where = f"hydra.sweep.dir={target_dir}" if case.sweep else f"hydra.run.dir={target_dir}"
    logger = [] if "logger=none" in args else ["logger=wandb"]
    head = ["-m"] if case.sweep else []
    train = [] if any(a.startswith(("task=", "train.epochs")) for a in args) else TINY
    try:
        p = _run([*head, *train, *args, *logger, where])
    finally:
        if case.name.startswith("read-only"):
            subprocess.run(["umount", str(d)])
        if hasattr(_locked, "lock"):
            _locked.lock.release()
            del _locked.lock
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    if case.sweep and lines:  # the sweep's report: its header and one line per job
        lines = lines[next(i for i, ln in enumerate(lines) if ln.startswith("error:")) :]
    first = lines[0] if lines else ""
    target = case.names.replace("{dir}", str(d)).replace("{root}", str(root))
    left = _new_files(before, _snapshot(d) if d.is_dir() else {}, case.allowed)
    left += [str(p.relative_to(root)) for p in root.rglob("*.tmp")]
    one = len(lines) == 1 or (case.sweep and all(ln.startswith(("error:", "  ")) for ln in lines))
    named = target in p.stderr
    clean = p.returncode != 0 and one and named and not left and "Traceback" not in p.stderr
    if case.recovers:  # rebuilt from the checkpoint: exit 0 and a done dir are right
        clean, left = p.returncode == 0 and (d / "done").exists(), []
    return {"rc": p.returncode, "first": first, "lines": len(lines), "named": named,
            "left": left, "clean": clean}  # fmt: skip


def _short(paths: list[str]) -> str:
    if not paths:
        return "-"
    more = f" (+{len(paths) - 3} more)" if len(paths) > 3 else ""
    return ", ".join(paths[:3]) + more


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--only", default="")
    ap.add_argument("--skip", type=int, default=0, help="start at case number SKIP + 1")
    a = ap.parse_args()
    rows = ["| # | input | exit | first line of stderr | lines | names it | left behind | clean |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    n_clean = n = 0
    for i, case in enumerate(c for c in CASES if a.only in c.name):
        if i < a.skip:
            continue
        with tempfile.TemporaryDirectory(prefix="pfc-bad-") as tmp:
            r = run_case(case, Path(tmp))
        first = r["first"].replace(tmp, "<tmp>").replace("|", "\\|")
        if len(case.sub) > 40:  # a name too long to show
            first = first.replace(case.sub, f"<{len(case.sub)} chars>")
        if len(first) > 150:
            first = first[:147] + "..."
        args = " ".join(case.args)
        for long, short in ABBREV:
            args = args.replace(long, short)
        args = args.replace("{root}", "<tmp>/data")
        n += r["rc"] != "-"
        n_clean += bool(r.get("clean"))
        rows.append(
            f"| {i + 1} | {case.name}: `{args}` | {r['rc']} | `{first}` | {r.get('lines', '')} | "
            f"{'yes' if r.get('named') else 'no'} | {_short(r.get('left', []))} | "
            f"{'yes' if r.get('clean') else 'no'} |"
        )
        print(rows[-1], flush=True)
    rows.append(f"\n{n_clean} of {n} cases clean.")
    rows.append("\nIn the inputs: " + "; ".join(f"`{b}` = `{a}`" for a, b in ABBREV) + ".")
    print(rows[-1])
    if a.out:
        a.out.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
