"""Checkpoints as people save them: training checkpoints, wrapper prefixes, the wrong --arch, and a
user's own nn.Module class by import path (imported only when the caller names it)."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from trojanscan import TrojanscanError, build_model, load_model
from trojanscan.cli import app
from trojanscan.models import ARCH_HELP, import_architecture

SHAPE = (1, 16, 16)
USER_NETS = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 16 * 16, num_classes)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


class NeedsArgs(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, 2)


NOT_A_CLASS = 3
'''


@pytest.fixture()
def user_nets(tmp_path, monkeypatch):
    """A package of the user's own, importable as ``user_nets_pkg.nets``."""
    pkg = tmp_path / "user_nets_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent(USER_NETS))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield import_architecture("user_nets_pkg.nets:TinyNet")
    for name in ("user_nets_pkg", "user_nets_pkg.nets"):
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return build_model("mnist-cnn", 10, SHAPE).eval()


def _same(a: nn.Module, b: nn.Module) -> bool:
    x = torch.rand(4, *SHAPE)
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-6)


@pytest.mark.parametrize("shape", ["bare", "state_dict", "model_state_dict", "model", "net", "nested",
                                   "module.", "_orig_mod.module."])
def test_each_checkpoint_shape_loads(tmp_path, reference, shape):
    state = reference.state_dict()
    if shape.endswith("."):  # DataParallel, torch.compile(DataParallel(...))
        payload: object = {shape + k: v for k, v in state.items()}
    elif shape == "bare":
        payload = state
    elif shape == "nested":
        payload = {"model": {"state_dict": state}, "epoch": 3}
    else:
        payload = {shape: state, "epoch": 3, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}
    path = tmp_path / "ckpt.pth"
    torch.save(payload, path)
    loaded = load_model(path, arch="mnist-cnn", input_shape=SHAPE)
    assert loaded.format == "checkpoint" and loaded.num_classes == 10 and _same(reference, loaded.module)
    if shape not in ("bare",) and not shape.endswith("."):
        assert loaded.metadata["epoch"] == 3 and "optimizer" not in loaded.metadata


def test_the_wrong_arch_names_the_keys_and_the_one_that_fits(tmp_path, reference):
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": reference.state_dict(), "epoch": 3}, path)
    with pytest.raises(TrojanscanError) as caught:
        load_model(path, arch="mlp", input_shape=SHAPE)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: weights do not fit architecture 'mlp'")
    assert "missing key(s) " in message and "unexpected key(s) " in message
    assert "they fit --arch mnist-cnn" in message
    assert "lacks 'num_classes'" not in message


def test_foreign_weights_list_the_architectures(tmp_path, user_nets):
    path = tmp_path / "foreign.pth"
    torch.save({"model_state_dict": user_nets().state_dict(), "epoch": 1}, path)
    with pytest.raises(TrojanscanError) as caught:
        load_model(path, arch="mnist-cnn", input_shape=SHAPE)
    message = str(caught.value)
    assert "missing key(s) classifier.bias" in message
    assert "unexpected key(s) conv.bias, conv.weight" in message
    assert "architectures: mnist-cnn, gtsrb-cnn" in message and "package.module:Class" in message
    with pytest.raises(TrojanscanError, match="needs its architecture.*package.module:Class"):
        load_model(path)
    with pytest.raises(TrojanscanError, match="unknown architecture 'resnet18'; architectures: "):
        load_model(path, arch="resnet18")


def test_a_users_class_by_import_path_by_class_and_by_instance(tmp_path, user_nets):
    torch.manual_seed(1)
    net = user_nets().eval()
    ckpt, st = tmp_path / "user.pth", tmp_path / "user.safetensors"
    torch.save({"net": {"module." + k: v for k, v in net.state_dict().items()}}, ckpt)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(st))
    for path in (ckpt, st):
        for arch in ("user_nets_pkg.nets:TinyNet", user_nets, user_nets()):
            loaded = load_model(path, arch=arch)
            assert _same(net, loaded.module) and loaded.spec is None
            assert loaded.metadata["arch"] == "user_nets_pkg.nets:TinyNet"
    with pytest.raises(TrojanscanError, match="no trojanscan metadata.*--arch"):
        load_model(st)
    five, few = user_nets(num_classes=5).eval(), tmp_path / "five.pth"
    torch.save(five.state_dict(), few)
    with pytest.raises(TrojanscanError, match=r"fit user_nets_pkg.nets:TinyNet \(size mismatch for head"):
        load_model(few, arch="user_nets_pkg.nets:TinyNet")
    assert _same(five, load_model(few, arch=user_nets(num_classes=5)).module)  # constructor arguments


@pytest.mark.parametrize(("arch", "needle"), [
    ("user_nets_pkg.nets:NeedsArgs", "cannot build user_nets_pkg.nets:NeedsArgs with no arguments"),
    ("user_nets_pkg.nets:NOT_A_CLASS", "NOT_A_CLASS in user_nets_pkg.nets is not an nn.Module class"),
    ("user_nets_pkg.nets:Missing", "Missing in user_nets_pkg.nets is not an nn.Module class"),
    ("user_nets_pkg.nope:TinyNet", "cannot import user_nets_pkg.nope (ModuleNotFoundError"),
    ("user_nets_pkg.nets:Tiny Net", "not an architecture"),
])
def test_import_path_mistakes_are_one_line(tmp_path, user_nets, arch, needle):
    path = tmp_path / "user.pth"
    torch.save(user_nets().state_dict(), path)
    with pytest.raises(TrojanscanError) as caught:
        load_model(path, arch=arch)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_a_name_inside_the_file_is_never_imported(tmp_path, monkeypatch, reference):
    marker = tmp_path / "imported.txt"
    (tmp_path / "planted_arch_mod.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nimport torch\nNet = torch.nn.Linear\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "planted.pth"
    torch.save({"state_dict": reference.state_dict(), "arch": "planted_arch_mod:Net", "num_classes": 10,
                "input_shape": list(SHAPE), "mean": [0.5], "std": [0.5]}, path)
    with pytest.raises(TrojanscanError, match="unknown architecture 'planted_arch_mod:Net'"):
        load_model(path)
    assert not marker.exists() and "planted_arch_mod" not in sys.modules


def test_loaded_model_is_callable_with_its_metadata(tmp_path, reference):
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": reference.state_dict()}, path)
    loaded = load_model(path, arch="mnist-cnn", input_shape=SHAPE)
    x = torch.rand(3, *SHAPE)
    with torch.no_grad():
        assert torch.equal(loaded(x), loaded.module(x))
    assert loaded.eval() is loaded.module and not loaded.training
    assert len(list(loaded.parameters())) == len(list(reference.parameters()))
    assert len(loaded.sha256) == 64 and loaded.input_shape == SHAPE


def test_the_command_line_takes_an_import_path_and_lists_the_architectures(tmp_path, user_nets, digits):
    torch.manual_seed(2)
    path = tmp_path / "user.pth"
    torch.save({"model_state_dict": user_nets().state_dict(), "epoch": 9}, path)
    runner = CliRunner()
    ok = runner.invoke(app, ["evaluate", str(path), "--data", "digits", "--arch",
                             "user_nets_pkg.nets:TinyNet"])
    assert ok.exit_code == 0, ok.output
    wrong = runner.invoke(app, ["evaluate", str(path), "--data", "digits", "--arch", "gtsrb-cnn"])
    assert wrong.exit_code == 2 and "missing key(s)" in wrong.output and "mnist-cnn" in wrong.output
    assert "mnist-cnn" in ARCH_HELP and "package.module:Class" in ARCH_HELP


def test_an_arch_that_contradicts_the_file_is_refused(tmp_path):
    from trojanscan import save_model

    path = tmp_path / "m.safetensors"
    save_model(build_model("mnist-cnn", 10, (1, 28, 28)), path)
    assert load_model(path, arch="mnist-cnn").spec.arch == "mnist-cnn"  # agreeing is fine
    with pytest.raises(TrojanscanError, match="records architecture 'mnist-cnn', not --arch 'gtsrb-cnn'"):
        load_model(path, arch="gtsrb-cnn")


def test_a_module_in_the_working_directory_is_found_as_python_would(tmp_path, monkeypatch):
    """`trojanscan ... --arch mynet:Net` run beside mynet.py: the console script does not put the
    working directory on sys.path, python -m does; we find it without PYTHONPATH=."""
    (tmp_path / "mynet_here.py").write_text(textwrap.dedent(USER_NETS))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    try:
        cls = import_architecture("mynet_here:TinyNet")
        assert cls.__name__ == "TinyNet" and str(tmp_path) not in sys.path
    finally:
        sys.modules.pop("mynet_here", None)
    with pytest.raises(TrojanscanError, match="cannot import no_such_mod"):
        import_architecture("no_such_mod:Net")
