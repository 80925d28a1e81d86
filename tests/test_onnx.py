"""ONNX models: trojanscan's own converter gives the original's outputs and scan, writes a repaired
model back as ONNX, and refuses unsafe or unsupported files in one line."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from trojanscan import load_model, repair, scan
from trojanscan.cli import app
from trojanscan.models import build_model, save_model
from trojanscan.models.onnx_import import OnnxModel
from trojanscan.models.taps import find_layer

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

runner = CliRunner()
SHAPES = {"mnist-cnn": (1, 8, 8), "gtsrb-cnn": (3, 16, 16), "cifar-cnn": (3, 16, 16), "mlp": (1, 8, 8),
          "resnet-small": (3, 16, 16), "mobilenet-small": (3, 16, 16)}


def export(model: torch.nn.Module, shape: tuple[int, ...], path) -> None:
    """torch's TorchScript-based exporter (dynamo=False: the dynamo one needs onnxscript)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.rand(1, *shape),), str(path), dynamo=False,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})


@pytest.mark.parametrize("arch", sorted(SHAPES))
def test_reference_nets_convert_exactly(arch, tmp_path):
    shape = SHAPES[arch]
    torch.manual_seed(0)
    net = build_model(arch, 5, shape, mean=[0.4] * shape[0], std=[0.2] * shape[0]).eval()
    for m in net.modules():  # non-trivial batch-norm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    export(net, shape, tmp_path / "m.onnx")
    loaded = load_model(tmp_path / "m.onnx", input_shape=shape)
    assert loaded.format == "onnx" and isinstance(loaded.module, OnnxModel)
    assert loaded.input_shape == shape and loaded.num_classes == 5
    x = torch.rand(7, *shape)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x), atol=1e-5, rtol=1e-5)
    assert loaded.inspection["onnx"]["runtime_check"]["checked"] is (
        __import__("importlib").util.find_spec("onnxruntime") is not None)
    assert find_layer(loaded.module).module.out_features == 5  # the classifier is a real nn.Linear


@pytest.fixture(scope="module")
def onnx_trojaned(trojaned_digits, digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "trojaned.onnx"
    export(trojaned_digits.model, digits.input_shape, path)
    return path


def test_scan_of_onnx_model_matches_the_original(trojaned_digits, digits, onnx_trojaned):
    options = dict(clean_samples=100, steps=20, progress=False)
    original = scan(trojaned_digits.model, digits, **options)
    converted = scan(onnx_trojaned, digits, **options)
    assert converted.flagged_labels == original.flagged_labels
    assert np.allclose([r.l1_norm for r in converted.labels], [r.l1_norm for r in original.labels],
                       rtol=1e-3, atol=1e-3)


def test_repair_writes_onnx_that_reloads(trojaned_digits, digits, onnx_trojaned, tmp_path):
    result = scan(onnx_trojaned, digits, clean_samples=100, steps=10, labels=[0, 1, 2],
                  out_dir=tmp_path / "scan", progress=False)
    out = tmp_path / "fixed.onnx"
    record = repair(onnx_trojaned, result, digits, method="unlearn", fraction=0.2, epochs=1,
                    labels=[0], out=out)
    again = load_model(out, input_shape=digits.input_shape)
    x = digits.x_test[:32]
    with torch.no_grad():
        assert torch.allclose(again(x), record.model(x), atol=1e-5)
        assert not torch.allclose(again(x), load_model(onnx_trojaned)(x), atol=1e-3)  # weights changed
    assert again.metadata["repaired_by"] == "unlearn"
    with pytest.raises(ValueError, match=r"saved as \.onnx"):
        save_model(record.model, tmp_path / "fixed.safetensors")


def _graph_model(nodes, initializers, opset=17, inputs=None):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])]
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _gemm(weight=None):
    w = numpy_helper.from_array(np.ones((2, 4), np.float32) if weight is None else weight, "w")
    return _graph_model([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="fc")], [w])


def _external():
    m = _gemm()
    w = m.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value="../../etc/passwd")
    return m


def _bogus_size():
    m = _gemm()
    del m.graph.initializer[0].dims[:]
    m.graph.initializer[0].dims.extend([2, 4000])
    return m


def _custom_domain():
    m = _gemm()
    m.graph.node[0].domain = "com.example"
    return m


def _custom_opset():
    m = _gemm()
    m.opset_import.add(domain="com.example", version=1)
    return m


def _subgraph():
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "b", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 4])])
    cond = numpy_helper.from_array(np.array(True), "c")
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    return _graph_model([node], [cond])


def _function():
    m = _gemm()
    m.functions.add(name="f", domain="local")
    return m


CASES = {
    "subgraph": (_subgraph, "unsupported ONNX operator(s) If"),
    "function": (_function, "model-local function"),
    "external": (_external, "external data"),
    "bogus-size": (_bogus_size, "declares shape (2, 4000)"),
    "unsupported-op": (lambda: _graph_model([helper.make_node("TopK", ["x", "k"], ["y", "i"])],
                                            [numpy_helper.from_array(np.array([2]), "k")]),
                       "unsupported ONNX operator(s) TopK"),
    "domain": (_custom_domain, "outside the default ONNX domain: com.example:Gemm"),
    "opset-domain": (_custom_opset, "operator set 'com.example'"),
    "truncated": (lambda: _gemm().SerializeToString()[:-9], "corrupt or truncated ONNX file"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_unsafe_or_unsupported_files_are_refused_in_one_line(case, tmp_path):
    make, expected = CASES[case]
    made = make()
    path = tmp_path / "bad.onnx"
    path.write_bytes(made if isinstance(made, bytes) else made.SerializeToString())
    result = runner.invoke(app, ["evaluate", str(path), "--data", "digits"])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_plain_model_is_not_saved_as_onnx(tmp_path):
    with pytest.raises(ValueError, match="only a model read from an ONNX file"):
        save_model(build_model("mlp", 2, (1, 4, 4)), tmp_path / "m.onnx")


def test_missing_onnx_package_says_how_to_install(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnx":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    path = tmp_path / "m.onnx"
    path.write_bytes(_gemm().SerializeToString())
    monkeypatch.setattr(builtins, "__import__", no_onnx)
    with pytest.raises(ValueError, match=r"needs the onnx package: pip install 'trojanscan\[onnx\]'"):
        load_model(path)
