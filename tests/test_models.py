"""Reference nets, and model files: round trips in every safe format, refusal of unsafe ones."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trojanscan import TrojanscanError, build_model, load_model, save_model
from trojanscan.models import ARCHITECTURES
from trojanscan.models.inference import frozen_for_inference


@pytest.mark.parametrize("arch,shape,k", [("mnist-cnn", (1, 28, 28), 10),
                                          ("gtsrb-cnn", (3, 32, 32), 43),
                                          ("cifar-cnn", (3, 32, 32), 10),
                                          ("mnist-cnn", (1, 16, 16), 10)])
def test_architectures_take_unit_range_images(arch, shape, k):
    model = build_model(arch, k, shape).eval()
    out = model(torch.rand(2, *shape))
    assert out.shape == (2, k)
    assert model.penultimate(torch.rand(2, *shape)).dim() == 2


def test_normalisation_is_the_first_layer():
    model = build_model("mnist-cnn", 10, (1, 28, 28), mean=[0.1307], std=[0.3081])
    x = torch.rand(1, 1, 28, 28)
    assert torch.allclose(model.normalize(x), (x - 0.1307) / 0.3081)


def test_unknown_architecture_is_named():
    with pytest.raises(TrojanscanError, match="unknown architecture 'resnet9'.*cifar-cnn"):
        build_model("resnet9", 10, (3, 32, 32))


def _same_outputs(a, b, shape):
    x = torch.rand(4, *shape)
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-6)


@pytest.mark.parametrize("suffix,fmt", [(".safetensors", "safetensors"), (".pt", "torchscript")])
def test_save_load_round_trip(tmp_path, suffix, fmt):
    model = build_model("mnist-cnn", 10, (1, 16, 16), mean=[0.2], std=[0.3]).eval()
    path = save_model(model, tmp_path / f"m{suffix}", metadata={"note": "hi"})
    loaded = load_model(path)
    assert loaded.format == fmt
    assert loaded.num_classes == 10 and loaded.input_shape == (1, 16, 16)
    assert loaded.metadata["note"] == "hi" and len(loaded.sha256) == 64
    assert _same_outputs(model, loaded.module, (1, 16, 16))
    assert not loaded.module.training


def test_weights_only_checkpoint_loads_with_its_architecture(tmp_path):
    model = build_model("mnist-cnn", 10, (1, 16, 16)).eval()
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    with pytest.raises(TrojanscanError, match="needs its architecture"):
        load_model(bare)
    with pytest.raises(TrojanscanError, match="lacks 'input_shape'"):
        load_model(bare, arch="mnist-cnn")
    from_bare = load_model(bare, arch="mnist-cnn", input_shape=(1, 16, 16))
    assert from_bare.num_classes == 10 and _same_outputs(model, from_bare.module, (1, 16, 16))
    full = tmp_path / "full.pth"
    torch.save({"state_dict": model.state_dict(), **model.spec.to_dict()}, full)
    loaded = load_model(full)
    assert loaded.format == "checkpoint" and _same_outputs(model, loaded.module, (1, 16, 16))


class _Planted:
    """An object whose unpickling would create a file: what a malicious checkpoint does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "model.pth"
    payload = {"state_dict": {"w": torch.zeros(1)}, "x": _Planted(str(marker))}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    assert not marker.exists()
    with pytest.raises(TrojanscanError, match="refused"):
        load_model(path, arch="mnist-cnn")
    assert not marker.exists(), "loading must never execute the pickle's code"


def test_corrupt_and_unknown_files_get_clear_errors(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello, not a model")
    with pytest.raises(TrojanscanError, match="junk.pt: not a model file"):
        load_model(junk)
    model = build_model("mnist-cnn", 10, (1, 16, 16))
    good = save_model(model, tmp_path / "m.safetensors")
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TrojanscanError, match="cut.safetensors: corrupt safetensors"):
        load_model(cut)
    with pytest.raises(TrojanscanError, match="no such model file"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(TrojanscanError, match="unknown model format"):
        save_model(model, tmp_path / "m.h5")


def test_safetensors_weights_must_fit_the_architecture(tmp_path):
    small = build_model("mnist-cnn", 10, (1, 16, 16))
    path = save_model(small, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["trojanscan"])
    meta["num_classes"] = 5
    save_file(load_file(str(path)), str(path), metadata={"trojanscan": json.dumps(meta)})
    with pytest.raises(TrojanscanError, match="do not fit architecture"):
        load_model(path)


def test_all_architectures_are_listed():
    assert set(ARCHITECTURES) == {"mnist-cnn", "gtsrb-cnn", "cifar-cnn", "mlp", "resnet-small",
                                  "mobilenet-small", "vgg-gap", "resnet-flat"}


@pytest.mark.parametrize("arch", ["mlp", "resnet-small", "mobilenet-small", "vgg-gap", "resnet-flat"])
def test_new_families_round_trip_through_both_formats(arch, tmp_path):
    from trojanscan import build_model, load_model, save_model

    model = build_model(arch, 10, (1, 16, 16)).eval()
    x = torch.rand(4, 1, 16, 16)
    for suffix in (".safetensors", ".pt"):
        path = save_model(model, tmp_path / f"m{suffix}")
        loaded = load_model(path, input_shape=(1, 16, 16))
        assert torch.allclose(loaded.module(x), model(x), atol=1e-5) and loaded.trust_label == "checked"


# --- frozen copies for fast inference ---------------------------------------------------------------


class _Branchy(torch.nn.Module):
    """Data-dependent control flow: a trace of one batch would be wrong for others."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.mean() > 0.5 else -self.fc(x)


@pytest.mark.parametrize("arch,shape,k", [("mnist-cnn", (1, 28, 28), 10), ("gtsrb-cnn", (3, 32, 32), 43)])
def test_frozen_copy_gives_the_same_logits(arch, shape, k):
    model = build_model(arch, k, shape).train()
    fast = frozen_for_inference(model, torch.rand(8, *shape))
    assert fast is not None and model.training  # the model itself is left as it was
    x = torch.rand(37, *shape)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model.eval()(x), atol=1e-4, rtol=1e-4)


def test_frozen_copy_refuses_what_tracing_could_get_wrong():
    branchy = _Branchy()
    assert frozen_for_inference(branchy, torch.rand(4, 4)) is None  # unknown layer: run it eagerly
    scripted = frozen_for_inference(torch.jit.script(branchy), torch.rand(4, 4))
    assert scripted is not None  # scripting keeps the branch
    for x in (torch.zeros(2, 4), torch.ones(2, 4)):
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), branchy(x))
    assert frozen_for_inference(build_model("mnist-cnn", 10, (1, 28, 28)), torch.rand(8, 1, 16, 16)) is None
