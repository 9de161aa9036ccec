"""A user's own model and data, held to the standard of the config (issue 19).

Every defect ends as one stderr line naming the module or the item, a non-zero exit, no
traceback, and nothing left behind (no results, checkpoint, fingerprint, run id or W&B run):
the hook checks of ``arch=module`` (a layer listed twice, a studied module run twice or
never, modules run in another order than listed), the data checks of ``dataset=module``
(labels, features, shapes, empty or one-class splits, unreadable items, in ``ImageFolder``s
of real PNG files and in a user's ``Dataset`` class, in memory and streamed) and output
dirs the file system refuses. The model is ``tests/helpers/user_model.py``, the data set
``tests/helpers/user_data.py``; both are reached only through ``_target_``.
"""

from __future__ import annotations

import os
from pathlib import Path

import fakedata
import pytest
import torch
from conftest import HELPERS, REPO, launch
from user_model import Mixer, Twice

from pfc_sweeps.nets.hooks import FeatureNet, ModelSpecError
from pfc_sweeps.results.schema import CHECKPOINT_FILE

X = torch.randn(4, 1, 8, 8)
MIXER = [
    "arch=module",
    "arch.model={_target_: user_model.Mixer, num_classes: null, in_channels: null, width: 8}",
    "arch.layers=[conv,proj,blocks.*]",
    "arch.classifier=head",
]
TWICE = [
    "arch=module",
    "arch.model={_target_: user_model.Twice, num_classes: null, in_shape: null}",
]
TWICE += ["arch.classifier=head"]
FAST = ["train.epochs=1", "train.geodesic_points=3", "logger=wandb"]  # W&B offline
HYDRA_OWN = {".hydra", "launch.log"}  # what Hydra itself writes before the job starts


# ----------------------------------------------------------------------------- hooks, in process
def _hand_features(net: torch.nn.Module, names: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    """Input of the first module and each module's output, by hooks placed by hand."""
    out: list[torch.Tensor] = []
    first = net.get_submodule(names[0])
    hooks = [first.register_forward_pre_hook(lambda _m, a: out.append(a[0]))]
    for n in names:
        hooks.append(net.get_submodule(n).register_forward_hook(lambda _m, _a, o: out.append(o)))
    with torch.no_grad():
        net.eval()(x)
    for h in hooks:
        h.remove()
    return out


def test_each_use_in_its_own_module_gives_each_use_its_features():
    """The documented way to study a shared module: one wrapper per use (no error)."""
    torch.manual_seed(0)
    net = Twice(10, [1, 8, 8], tied=True)
    fnet = FeatureNet(net, ["stem", "use1", "use2"], "head", 10)
    fnet.check_forward(X)
    _, feats, clf_in = fnet.eval().extract(X)
    with torch.no_grad():  # independent: the forward written out
        h0 = net.stem(X)
        h1 = net.shared(h0)
        h2 = net.shared(h1)
    for got, want in zip(feats, [X, h0, h1, h2], strict=True):
        assert torch.equal(got, want)
    assert torch.equal(clf_in, h2) and not torch.equal(h1, h2)


def test_features_are_recorded_under_their_names_in_forward_order():
    torch.manual_seed(0)
    net = Mixer(10, width=8)
    names = ["conv", "proj", "blocks.0", "blocks.1", "blocks.2"]
    fnet = FeatureNet(net, ["conv", "proj", "blocks.*"], "head", 10).eval()
    _, feats, _ = fnet.extract(X)
    want = _hand_features(net, names, X)
    assert len(feats) == 6 and all(torch.equal(a, b) for a, b in zip(feats, want, strict=True))


@pytest.mark.parametrize(
    ("layers", "needle"),
    [
        (["conv", "proj", "proj"], "module 'proj' is listed twice (by entries 'proj' and 'proj')"),
        (["conv", "blocks.*", "blocks.1"], "module 'blocks.1' is listed twice"),
        (["conv", "blocks.1", "blocks.0"], "module 'blocks.0' ran before 'blocks.1' but is listed"),
        (["blocks", "blocks.0"], "module 'blocks' never ran in Mixer.forward"),
    ],
)
def test_mixer_layers_that_do_not_match_the_forward(layers, needle):
    with pytest.raises(ModelSpecError) as e:
        FeatureNet(Mixer(10, width=8), layers, "head", 10).check_forward(X)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_blocks_0_0_then_blocks_0_is_out_of_order_not_nested_silently():
    """A child listed before its parent: both run once, but the parent's output comes last."""
    with pytest.raises(ModelSpecError, match=r"list the studied modules in forward order: "):
        FeatureNet(Mixer(10, width=8), ["blocks.0", "blocks.0.0"], "head", 10).check_forward(X)


@pytest.mark.parametrize(
    ("kw", "layers", "needle"),
    [
        ({}, ["stem", "shared"], "module 'shared' ran 2 times in one Twice.forward"),
        ({}, ["stem", "spare"], "module 'spare' never ran in Twice.forward"),
        ({"tied": True}, ["stem", "use1", "shared"], "module 'shared' ran 2 times"),
        ({"tied": True}, ["stem", "shared", "use1.0"], "'use1.0' (the same module as 'shared')"),
    ],
)
def test_weight_sharing_is_refused_with_how_to_study_it(kw, layers, needle):
    with pytest.raises(ModelSpecError) as e:
        FeatureNet(Twice(10, [1, 8, 8], **kw), layers, "head", 10).check_forward(X)
    assert needle in str(e.value), e.value
    if "ran 2 times" in needle:
        assert "give each use its own module" in str(e.value)


def test_every_metric_forward_is_checked():
    """A forward that changes after the job's first check is caught on the metric pass."""
    net = Mixer(10, width=8)
    fnet = FeatureNet(net, ["conv", "proj", "blocks.*"], "head", 10)
    fnet.check_forward(X)

    def forward(x: torch.Tensor) -> torch.Tensor:  # now runs blocks.2 twice
        h = net.proj(net.pool(net.conv(x)).flatten(1))
        for blk in [*net.blocks, net.blocks[2]]:
            h = h + blk(h)
        return net.head(h)

    net.forward = forward
    with pytest.raises(ModelSpecError, match=r"'blocks\.2' ran 2 times"):
        fnet.extract(X)


# ----------------------------------------------------------------------------- through launch.py
def _env(extra: Path | None = None) -> dict:
    paths = [str(REPO), str(HELPERS), *([str(extra)] if extra else [])]
    return {"PYTHONPATH": os.pathsep.join(paths)}


def _digits(train: dict | None = None, test: dict | None = None) -> list[str]:
    def node(kw: dict, is_train: bool) -> str:
        args = "".join(f", {k}: {v}" for k, v in {"train": is_train, **kw}.items())
        return f"{{_target_: user_data.Digits{args}}}"

    return [
        "dataset=module",
        f"dataset.train={node(train or {}, True)}",
        f"dataset.test={node(test or {}, False)}",
    ]


def assert_one_clean_line(p, out: Path, needle: str) -> str:
    """Non-zero exit, one stderr line holding ``needle``, no traceback, nothing left in ``out``."""
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0, p.stdout
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    left = {f.relative_to(out).parts[0] for f in out.rglob("*")} if out.exists() else set()
    assert not left - HYDRA_OWN, left  # no results, checkpoint, fingerprint, run_id, wandb/
    return lines[0]


def _launch(out: Path, *args: str, env: dict | None = None):
    return launch(*args, *FAST, f"hydra.run.dir={out}", env=env or _env(), timeout=300)


MIXER_AS = [*MIXER[:2], "arch.classifier=head"]  # with other arch.layers
HOOK_CASES = [
    pytest.param(
        [*MIXER_AS, "arch.layers=[conv,proj,proj]"], "'proj' is listed twice", id="listed-twice"
    ),
    pytest.param([*TWICE, "arch.layers=[stem,shared]"], "'shared' ran 2 times", id="run-twice"),
    pytest.param([*TWICE, "arch.layers=[stem,spare]"], "'spare' never ran", id="never-run"),
    pytest.param(
        [*MIXER_AS, "arch.layers=[conv,blocks.1,blocks.0]"],
        "'blocks.0' ran before 'blocks.1'",
        id="out-of-order",
    ),
]


@pytest.mark.parametrize(("args", "needle"), HOOK_CASES)
def test_launch_refuses_a_model_whose_forward_does_not_match_its_layers(tmp_path, args, needle):
    out = tmp_path / "job"
    line = assert_one_clean_line(_launch(out, *args), out, needle)
    assert line.startswith("error: arch.layers: module ")


DATA_CASES = [
    pytest.param({"defect": "nan_pixel"}, {}, "dataset.train item 7 holds non-finite", id="nan"),
    pytest.param({"defect": "inf_pixel", "targets": True}, {}, "dataset.train item 7 holds non-finite", id="inf"),
    pytest.param({"defect": "negative"}, {}, "dataset.train item 7: label -1 is negative", id="negative"),
    pytest.param({"defect": "float", "targets": True}, {}, "dataset.train item 7: label 2.5 (float64) is not an integer", id="float"),
    pytest.param({"defect": "text"}, {}, "dataset.train item 7: label 'seven' (str) is not an integer", id="text"),
    pytest.param({"defect": "big", "classes": True}, {}, "dataset.train item 7: label 10 >= num_classes=10", id="too-big"),
    pytest.param({"defect": "no9", "classes": True}, {}, "dataset.train has no item of class(es) 9", id="train-lacks-a-class"),
    pytest.param({"defect": "no9"}, {"targets": True}, "dataset.test has items of class(es) 9 that dataset.train lacks", id="test-has-more-classes"),
    pytest.param({"defect": "no9"}, {}, "dataset.test item 10: label 9 is not a class of dataset.train", id="test-has-more-classes-items"),
    pytest.param({"defect": "shape"}, {}, "dataset.train item 7 has shape (1, 9, 9) but dataset.train item 0 has (1, 8, 8)", id="shape"),
    pytest.param({}, {"defect": "shape", "at": 3}, "dataset.test item 3 has shape (1, 9, 9)", id="test-shape"),
    pytest.param({"defect": "empty"}, {}, "dataset.train is empty (0 items)", id="empty"),
    pytest.param({}, {"defect": "empty"}, "dataset.test is empty (0 items)", id="empty-test"),
    pytest.param({"defect": "single"}, {}, "dataset.train has a single class (3)", id="single-class"),
    pytest.param({}, {"defect": "single", "targets": True}, "dataset.test has a single class (3)", id="single-class-test"),
    pytest.param({"defect": "raises"}, {}, "dataset.train item 7 could not be loaded (OSError: cannot read digit 7", id="raises"),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("train", "test", "needle"), DATA_CASES)
def test_launch_names_the_defective_item_of_a_users_dataset(tmp_path, train, test, needle):
    out = tmp_path / "job"
    line = assert_one_clean_line(_launch(out, *_digits(train, test), *MIXER), out, needle)
    if "could not be loaded" in line:
        assert line.endswith("the job stopped before any training")


def test_nan_pixel_is_named_as_data_not_the_learning_rate(tmp_path):
    out = tmp_path / "job"
    p = _launch(out, *_digits({"defect": "nan_pixel"}), *MIXER, "optim.lr=0.01")
    line = assert_one_clean_line(p, out, "dataset.train item 7 holds non-finite values")
    assert "a data problem" in line and "optim.lr" not in line and "diverged" not in line


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_data_stops_at_the_first_bad_item(tmp_path, workers):
    """Streamed (train.data_gb=0), also from DataLoader worker processes: same one line."""
    out = tmp_path / "job"
    args = [*_digits({"defect": "nan_pixel", "at": 250, "targets": True}), *MIXER]
    args += ["train.data_gb=0", f"train.num_workers={workers}"]
    line = assert_one_clean_line(
        _launch(out, *args), out, "dataset.train item 250 holds non-finite"
    )
    assert "before any results were written" in line


def test_real_divergence_says_the_inputs_were_checked(tmp_path):
    out = tmp_path / "job"
    p = launch("optim.lr=1e6", "arch.width=8", "arch.blocks=2", *FAST[:2], "logger=none",
               f"hydra.run.dir={out}", timeout=300)  # fmt: skip
    assert p.returncode != 0
    assert (
        "diverged" in p.stderr and "the inputs were checked when loaded and are finite" in p.stderr
    )


# ----------------------------------------------------------------------------- ImageFolder files
def _folder(root: Path) -> list[str]:
    node = "{_target_: torchvision.datasets.ImageFolder, root: %s, transform: {_target_: torchvision.transforms.ToTensor}}"
    return ["dataset=module", f"dataset.train={node % (root / 'train')}", f"dataset.test={node % (root / 'test')}"]  # fmt: skip


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "data"
    fakedata.write_image_folder(root, k=3, n_per_class=10, size=8)
    return root


def test_truncated_png_names_its_file(tmp_path, folder):
    bad = folder / "train" / "class1" / "4.png"
    bad.write_bytes(bad.read_bytes()[:60])  # cut inside the image data
    out = tmp_path / "job"
    line = assert_one_clean_line(
        _launch(out, *_folder(folder), *MIXER), out, f"({bad}) could not be loaded"
    )
    assert line.startswith("error: dataset.train item 14 ") and "before any training" in line


@pytest.mark.slow
def test_png_of_another_size_names_its_file(tmp_path, folder):
    from PIL import Image

    odd = folder / "test" / "class2" / "0.png"
    Image.new("RGB", (9, 8)).save(odd)
    out = tmp_path / "job"
    needle = (
        f"dataset.test item 4 ({odd}) has shape (3, 8, 9) but dataset.train item 0 has (3, 8, 8)"
    )
    assert_one_clean_line(_launch(out, *_folder(folder), *MIXER), out, needle)


@pytest.mark.slow
def test_test_folder_with_a_class_the_training_folder_lacks(tmp_path, folder):
    (folder / "test" / "class2").rename(folder / "test" / "class9")
    out = tmp_path / "job"
    needle = "dataset.test has classes class9 that dataset.train lacks"
    assert_one_clean_line(_launch(out, *_folder(folder), *MIXER), out, needle)


# ----------------------------------------------------------------------------- output dirs
def test_run_dir_name_too_long_is_one_line(tmp_path):
    out = tmp_path / ("x" * 300) / "job"
    p = _launch(out, "arch.width=8", "arch.blocks=2")
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"error: {out}: the file system refuses this name (File name too long)" in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sweep_dir_name_too_long_is_one_line(tmp_path):
    out = tmp_path / ("y" * 300)
    p = launch("-m", "seed=0,1", "arch.width=8", "arch.blocks=2", *FAST, f"hydra.sweep.dir={out}",
               env=_env(), timeout=300)  # fmt: skip
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0 and len(lines) == 1 and str(out) in lines[0], p.stderr
    assert list(tmp_path.iterdir()) == []


SITE = """
import errno, os
_mkdir = os.mkdir
def mkdir(path, *a, **kw):  # a file system that refuses ':' in names, as FAT and SMB do
    if ":" in os.path.basename(os.fspath(path)):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), os.fspath(path))
    return _mkdir(path, *a, **kw)
os.mkdir = mkdir
"""


@pytest.mark.slow
def test_run_dir_with_a_character_the_file_system_refuses(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    out = tmp_path / "runs" / "a:b"
    p = _launch(out, "arch.width=8", "arch.blocks=2", env=_env(site))
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"error: {out}: the file system refuses this name (Invalid argument)" in lines[0]
    assert sorted(tmp_path.iterdir()) == [site]  # runs/ was made for the try and removed


@pytest.mark.slow
def test_measuring_a_split_that_lacks_a_class_is_one_line(tmp_path):
    """A test split may lack a class (a user's small test set): training runs, and measuring
    that split (NC1-4 need every class mean) is one line naming the split, not a traceback."""
    job = tmp_path / "job"
    data = _digits({}, {"defect": "no9"})
    p = _launch(job, *data, *MIXER)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "measure"
    p = _launch(out, *data, *MIXER, "task=measure", "measure.split=test",
                f"arch.checkpoint={job / CHECKPOINT_FILE}")  # fmt: skip
    line = assert_one_clean_line(p, out, "the collapse metrics of the test split are undefined")
    assert "class(es) [9] have no samples" in line
