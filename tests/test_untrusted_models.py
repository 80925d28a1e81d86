"""Untrusted model files: a corpus of payloads that must never act, and real models that still load.

Every payload would create ``pwned`` in the test's folder if it ran (or leak a file, or hang, or
tell a scan from deployment). Each must be refused by ``load_model`` with a one-line
TrojanscanError naming the file (and for code, the method and the operator), and by the CLI with
exit status 2, one line on stderr and no traceback; the marker must never exist afterwards.
The probe is also tested as a sandbox on its own (payloads the checker would refuse, run anyway):
a victim file must come out of it intact.
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import struct
import sys
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typer.testing import CliRunner

from trojanscan import TrojanscanError, build_model, load_model, save_model
from trojanscan.fileio import json_depth
from trojanscan.models import io as model_io
from trojanscan.models import trust

SHAPE = (1, 16, 16)  # the digits data's images

# --- payloads: scripted modules --------------------------------------------------------------------


class SetStateSave(nn.Module):
    """Writes the marker the moment the archive is loaded (TorchScript calls __setstate__)."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.fc = nn.Parameter(torch.ones(10, 256) * 0.01)
        self.marker = marker

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.fc.t()

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool, Tensor]:
        return (self.marker, self.training, self.fc)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool, Tensor]) -> None:
        self.marker = state[0]
        self.training = state[1]
        self.fc = state[2]
        torch.save(torch.zeros(1), self.marker)


class ForwardSave(nn.Module):
    """Writes the marker every time the scanner runs the model."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 10)
        self.marker = marker

    def forward(self, x: Tensor) -> Tensor:
        torch.save(x, self.marker)
        return self.fc(x.flatten(1))


class FromFileCopy(nn.Module):
    """Reads a file the process can read and writes a copy of it out."""

    def __init__(self, secret: str, marker: str) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 10)
        self.secret = secret
        self.marker = marker

    def forward(self, x: Tensor) -> Tensor:
        stolen = torch.from_file(self.secret, False, 6, dtype=torch.uint8)
        torch.save(stolen, self.marker)
        return self.fc(x.flatten(1))


class GradBranch(nn.Module):
    """Clean while the trigger search differentiates through it, backdoored in deployment."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad:
            return self.fc(x.flatten(1))
        return self.fc(x.flatten(1)) + 100.0 * (x[:, :, -3:, -3:].mean() > 0.9)


class GradModeBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> Tensor:
        out = self.fc(x.flatten(1))
        if torch.is_grad_enabled():
            return out
        return -out


class Profiled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autograd.profiler.record_function("scan"):
            out = self.fc(x.flatten(1))
        return out


class CallCounter(nn.Module):
    """Counts its calls in a buffer: clean for the scanner's first calls, backdoored later."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 10)
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        self.calls.add_(1)
        out = self.fc(x.flatten(1))
        if bool(self.calls > 100000):
            out[:, 0] = 100.0
        return out


class SetStateReplay(nn.Module):
    """A harmless-looking __setstate__, called from forward to keep state between calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Parameter(torch.ones(10, 256) * 0.01)

    def forward(self, x: Tensor) -> Tensor:
        self.__setstate__((self.training, self.fc * 1.001))
        return x.flatten(1) @ self.fc.t()

    @torch.jit.export
    def __getstate__(self) -> tuple[bool, Tensor]:
        return (self.training, self.fc)

    @torch.jit.export
    def __setstate__(self, state: tuple[bool, Tensor]) -> None:
        self.training = state[0]
        self.fc = state[1]


class Printer(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        print("scanned", x.shape)
        return x.flatten(1)[:, :10]


class WhileTrue(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        while True:
            x = x + 1
        return x.flatten(1)[:, :10]


class NeverReturns(nn.Module):
    """Passes the static check; its forward never returns once the batch is larger than 2."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> Tensor:
        while x.size(0) > 2:
            x = x + 1
        return self.fc(x.flatten(1))


@torch.jit.script
class Counter:
    """A scripted helper object: its state lives on between the model's calls."""

    def __init__(self) -> None:
        self.n = 0

    def bump(self) -> int:
        self.n += 1
        return self.n


class ScriptedHelperState(nn.Module):
    """Counts its calls in a scripted helper object: clean for the scan, backdoored later."""

    def __init__(self) -> None:
        super().__init__()
        self.counter = Counter()
        self.fc = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> Tensor:
        out = self.fc(x.flatten(1))
        if self.counter.bump() > 100000:
            return out * 0.0 + 100.0
        return out


def _bump(t: Tensor) -> Tensor:
    return t.add_(1.0)


class HelperChangesBuffer(nn.Module):
    """Hands its own buffer to a function that changes it in place."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 10)
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        _bump(self.calls)
        return self.fc(x.flatten(1)) + (self.calls > 100000).float() * 100.0


class BatchNormStats(nn.Module):
    """Uses batch_norm's running statistics, updated on every call, as a memory."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 10)
        self.register_buffer("seen_mean", torch.zeros(256))
        self.register_buffer("seen_var", torch.ones(256))

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        torch.batch_norm(flat, None, None, self.seen_mean, self.seen_var, True, 1.0, 1e-5, False)
        return self.fc(flat) + self.seen_mean.mean()


class AppendAliasState(nn.Module):
    """Puts its own bias into a fresh list, then changes it through another name for the list."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> Tensor:
        kept: list[Tensor] = []
        alias = kept
        alias.append(self.fc.bias)
        kept[0].add_(1.0)
        return self.fc(x.flatten(1))


def _keep(items: list[Tensor], t: Tensor) -> None:
    items.append(t)


class StoreThroughHelper(nn.Module):
    """A helper function puts its bias into a list; the list's item is then changed in place."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> Tensor:
        kept: list[Tensor] = []
        _keep(kept, self.fc.bias)
        kept[0].add_(1.0)
        return self.fc(x.flatten(1))


class MmapWrite(nn.Module):
    """Maps a file shared and writes into it: no write() call for RLIMIT_FSIZE to stop."""

    def __init__(self, victim: str) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 10)
        self.victim = victim

    def forward(self, x: Tensor) -> Tensor:
        mapped = torch.from_file(self.victim, True, 8, dtype=torch.uint8)
        mapped.fill_(88)
        return self.fc(x.flatten(1)) + mapped.float().sum() * 0.0


class HangsOnTwo(nn.Module):
    """Never returns on a batch of exactly 2 (what check_model_fits tries first)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> Tensor:
        while x.size(0) == 2:
            x = x + 1
        return self.fc(x.flatten(1))


class ImplicitSoftmax(nn.Module):
    """Compiles torch's own softmax warning into the archive: the carrier for a forged message."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> Tensor:
        return F.softmax(self.fc(x.flatten(1)))


class Benign(nn.Module):
    """The carrier for hand-edited archives: a real payload is this model's code, rewritten."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 10)
        self.marker = marker

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.fc(torch.flatten(x, 1)))


# --- torchvision-style architectures (torchvision itself is not a dependency) ----------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(self.layer1(self.stem(x))), 1))


class TinyVGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(True), nn.MaxPool2d(2, 2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(True), nn.AvgPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(64, 32), nn.ReLU(True), nn.Dropout(0.5),
                                        nn.Linear(32, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, c // 4, 1)
        self.fc2 = nn.Conv2d(c // 4, c, 1)
        self.act = nn.SiLU()
        self.gate = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.Hardswish(), SqueezeExcite(hidden),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res:
            return x + self.conv(x)
        return self.conv(x)


class TinyMobileNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU6(True))
        self.separable = nn.Sequential(  # MobileNet v1: depthwise then pointwise
            nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(True),
            nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(True))
        self.blocks = nn.ModuleList([InvertedResidual(16, 16, 1, 4), InvertedResidual(16, 24, 2, 2)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(24, 10))

    def forward(self, x: Tensor) -> Tensor:
        x = self.separable(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.head(self.pool(x))


class TinyViT(nn.Module):
    """Patch embedding, one pre-norm self-attention block (hand-written and SDPA), an MLP."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv2d(1, dim, 4, 4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Embedding(17, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.GroupNorm(1, 17)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.size(0), -1, -1), x], dim=1)
        x = x + self.pos(torch.arange(17, device=x.device)).unsqueeze(0)
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(
            2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(c // self.heads), dim=-1)
        y = (att @ v + F.scaled_dot_product_attention(q, k, v)).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(y)
        x = x + self.mlp(self.norm2(x))
        return F.log_softmax(self.head(x[:, 0]), dim=-1)


class ControlFlow(nn.Module):
    """if / for / while on sizes, a list built in a loop, interpolation and padding."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)])
        self.fc = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
        x = F.pad(x, [0, 0, 0, 0])
        for i, conv in enumerate(self.convs):
            x = conv(x)
            x = F.leaky_relu(x, 0.1) if i % 2 == 0 else torch.clamp(x, -3.0, 3.0).sigmoid()
        x = F.max_pool2d(x, 2)
        n = 0
        while n < x.size(0):
            n += 1
        y = self.fc(x.reshape(x.size(0), -1))
        rows: list[Tensor] = []
        for j in range(y.size(0)):
            rows.append(y[j] * 2.0 if j % 2 == 0 else y[j])
        return torch.stack(rows) if n > 0 else y


# --- building the corpus ---------------------------------------------------------------------------


def _script(module: nn.Module, path: Path) -> Path:
    torch.jit.script(module.eval()).save(str(path))
    return path


def _rewrite(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None],
             extra: list[tuple[str, bytes]] = ()) -> Path:
    """Copy a zip entry by entry through ``edit(name, data)`` (None drops it), then add ``extra``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": the duplicate is the point
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info, data)
        for name, data in extra:
            zout.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
    return dst


RETURN = "    return _0\n"  # the carrier's last line, as TorchScript prints it


def _code_entry(path: Path, cls: str = "class Benign(") -> str:
    """The name of the code file that defines ``cls`` in a scripted archive."""
    with zipfile.ZipFile(path) as z:
        return next(n for n in z.namelist() if n.endswith(".py") and cls.encode() in z.read(n))


def _edit_code(src: Path, dst: Path, old: str, new: str) -> Path:
    """A hand-crafted archive: the benign carrier's forward, rewritten as an attacker would."""
    entry = _code_entry(src)

    def edit(name: str, data: bytes) -> bytes:
        if name == entry:
            text = data.decode()
            assert old in text, text
            return text.replace(old, new).encode()
        return data
    return _rewrite(src, dst, edit)


def _edit_entry(src: Path, dst: Path, suffix: str, old: str, new: str) -> Path:
    def edit(name: str, data: bytes) -> bytes:
        if name.endswith(suffix):
            text = data.decode()
            assert old in text, text
            return text.replace(old, new).encode()
        return data
    return _rewrite(src, dst, edit)


def _root(path: Path) -> str:
    with zipfile.ZipFile(path) as z:
        return z.namelist()[0].split("/", 1)[0]


def _patch_declared_size(path: Path, entry_suffix: str, size: int) -> None:
    """Make the central directory lie about an entry's uncompressed size."""
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, at + 28)
        name = bytes(data[at + 46: at + 46 + name_len]).decode()
        if name.endswith(entry_suffix):
            struct.pack_into("<L", data, at + 24, size)
            path.write_bytes(bytes(data))
            return
        at = data.find(b"PK\x01\x02", at + 46 + name_len + extra_len + comment_len)
    raise AssertionError(entry_suffix)


def _safetensors(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _deep(n: int) -> str:
    return "[" * n + "]" * n


class _Planted:
    """An object whose unpickling would create the marker: what a malicious checkpoint does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle(path: Path, marker: Path, protocol: int) -> Path:
    payload = {"state_dict": {"w": torch.zeros(1)}, "arch": "mnist-cnn", "x": _Planted(str(marker))}
    with open(path, "wb") as f:
        pickle.dump(payload, f, protocol=protocol)
    return path


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "pwned"
    yield m
    assert not m.exists(), "a payload ran: the marker file exists"


def _lying_metadata(path: Path, **claims: object) -> Path:
    meta = {"arch": "mnist-cnn", "num_classes": 10, "input_shape": [1, 16, 16], "mean": [0.5],
            "std": [0.5], "format_version": "1", **claims}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(1)}, str(path), metadata={"trojanscan": json.dumps(meta)})
    else:
        torch.save({"state_dict": {"w": torch.zeros(1)}, **meta}, path)
    return path


def _corpus(tmp: Path, marker: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """name → (file, substrings the one-line refusal must contain)."""
    m = str(marker)
    secret = tmp / "secret.txt"
    secret.write_text("hunter2")
    benign = _script(Benign(m), tmp / "benign.pt")
    root = _root(benign)
    c: dict[str, tuple[Path, tuple[str, ...]]] = {
        "setstate-save": (_script(SetStateSave(m), tmp / "setstate.pt"),
                          ("SetStateSave.__setstate__", "aten::save", "writes files")),
        "forward-save": (_script(ForwardSave(m), tmp / "fwd.pt"),
                         ("ForwardSave.forward", "aten::save")),
        "from-file": (_script(FromFileCopy(str(secret), m), tmp / "fromfile.pt"),
                      ("FromFileCopy.forward", "aten::from_file", "reads")),
        "requires-grad": (_script(GradBranch(), tmp / "grad.pt"),
                          ("GradBranch.forward", "prim::requires_grad", "scan from deployment")),
        "grad-mode": (_script(GradModeBranch(), tmp / "gradmode.pt"),
                      ("GradModeBranch.forward", "aten::is_grad_enabled")),
        "profiler": (_script(Profiled(), tmp / "profiled.pt"),
                     ("record_function.__enter__", "profiler::_record_function_enter_new")),
        "call-counter": (_script(CallCounter(), tmp / "counter.pt"),
                         ("CallCounter.forward", "state between calls")),
        "setstate-replay": (_script(SetStateReplay(), tmp / "replay.pt"),
                            ("SetStateReplay.forward", "__setstate__")),
        "print": (_script(Printer(), tmp / "print.pt"), ("Printer.forward", "print")),
        "while-true": (_script(WhileTrue(), tmp / "whiletrue.pt"),
                       ("WhileTrue.forward", "never end")),
        # hand-edited archives: what TorchScript would still load and run
        "crafted-aten-save": (_edit_code(benign, tmp / "crafted_save.pt", RETURN,
                                         "    marker = self.marker\n    ops.aten.save(x, marker)\n"
                                         + RETURN),
                              ("Benign.forward", "aten::save")),
        "custom-namespace": (_edit_code(benign, tmp / "custom_ns.pt", "torch.relu(",
                                        "ops.trojan.write_marker("),
                             ("Benign.forward", "trojan::write_marker", "custom operator namespace")),
        "profiler-op": (_edit_code(benign, tmp / "profiler_op.pt", RETURN,
                                   '    _1 = ops.profiler._record_function_enter("x", None)\n'
                                   + RETURN),
                        ("Benign.forward", "profiler::_record_function_enter", "profiler hook")),
        # names TorchScript would read as its own, rebound later in the method (or in a
        # comprehension) so that a per-method "is it local?" check is fooled
        "late-torch-save": (_edit_code(benign, tmp / "late_torch.pt", RETURN,
                                       "    if torch.eq(torch.size(x, 0), 2):\n"
                                       "      f = torch.save\n      f(x, self.marker)\n"
                                       "    torch = x\n" + RETURN),
                            ("Benign.forward", "reserved name 'torch'")),
        "late-print": (_edit_code(benign, tmp / "late_print.pt", RETURN,
                                  '    print("pwned")\n    print = 1\n' + RETURN),
                       ("Benign.forward", "reserved name 'print'")),
        "comprehension-shadows-ops": (_edit_code(benign, tmp / "comp_ops.pt", RETURN,
                                                 "    _9 = [0 for ops in [1]]\n"
                                                 "    f = ops.aten.save\n    f(x, self.marker)\n"
                                                 + RETURN),
                                      ("Benign.forward", "reserved name 'ops'")),
        # a method taken as a value, called later: the call is never checked by name
        "bound-method": (_edit_code(benign, tmp / "bound_method.pt", RETURN,
                                    "    f = x.as_strided\n    _9 = f([1], [1])\n" + RETURN),
                         ("Benign.forward", "as_strided")),
        "bound-inplace-state": (_edit_code(benign, tmp / "bound_inplace.pt", RETURN,
                                           "    g = fc.bias.add_\n    _9 = g(1.0)\n" + RETURN),
                                ("Benign.forward", "add_")),
        # state kept between calls through aliases, helpers and batch_norm's statistics
        "list-alias-state": (_edit_code(benign, tmp / "list_alias.pt", RETURN,
                                        "    ws = [fc.bias]\n    _9 = ws[0].add_(1.0)\n" + RETURN),
                             ("Benign.forward", "aten::add_", "state between calls")),
        "for-alias-state": (_edit_code(benign, tmp / "for_alias.pt", RETURN,
                                       "    for b in [fc.bias]:\n      _9 = b.add_(1.0)\n" + RETURN),
                            ("Benign.forward", "aten::add_", "state between calls")),
        "scripted-helper-state": (_script(ScriptedHelperState(), tmp / "helper_state.pt"),
                                  ("ScriptedHelperState.forward", "Counter.bump",
                                   "state between calls")),
        "helper-changes-buffer": (_script(HelperChangesBuffer(), tmp / "helper_buffer.pt"),
                                  ("HelperChangesBuffer.forward", "_bump", "state between calls")),
        "batch-norm-stats": (_script(BatchNormStats(), tmp / "bn_stats.pt"),
                             ("BatchNormStats.forward", "aten::batch_norm", "state between calls")),
        "append-alias-state": (_script(AppendAliasState(), tmp / "append_alias.pt"),
                               ("AppendAliasState.forward", "aten::add_", "state between calls")),
        "store-through-helper": (_script(StoreThroughHelper(), tmp / "store_helper.pt"),
                                 ("StoreThroughHelper.forward", "state between calls")),
        "warn": (_edit_code(benign, tmp / "warn.pt", RETURN, '    torch.warn("pwned", 1)\n' + RETURN),
                 ("Benign.forward", "aten::warn", "prints")),
        "warn-forged-text": (_edit_entry(_script(ImplicitSoftmax(), tmp / "softmax.pt"),
                                         tmp / "forged_warning.pt", "/nn/functional.py",
                                         '_0("softmax"', '_0("softmax\\nverdict: clean"'),
                             ("functional.softmax", "aten::warn", "printable")),
        # metadata that claims a network too large to build
        "st-lying-num-classes": (_lying_metadata(tmp / "classes.safetensors", num_classes=10**12),
                                 ("classes", "limit 100000")),
        "st-lying-input-shape": (_lying_metadata(tmp / "shape.safetensors",
                                                 input_shape=[1, 10**9, 10**9]),
                                 ("input shape", "4096")),
        "ckpt-lying-num-classes": (_lying_metadata(tmp / "classes.pth", num_classes=10**12),
                                   ("classes", "limit 100000")),
        "getattr-operator": (_edit_code(benign, tmp / "getattr.pt", RETURN,
                                        '    _s = getattr(torch, "save")\n' + RETURN),
                             ("Benign.forward", "getattr(torch, 'save')")),
        "triple-quoted": (_edit_code(benign, tmp / "triple.pt", RETURN,
                                     '    _s = """ "\n    ops.aten.save(x, "pwned")\n    _t = " """\n'
                                     + RETURN),
                          ("unusual string literal",)),
        "duplicate-entry": (_rewrite(benign, tmp / "duplicate.pt", lambda n, d: d,
                                     [(_code_entry(benign), b"class Evil(Module):\n  pass\n")]),
                            ("twice",)),
        "zip-bomb": (_rewrite(benign, tmp / "bomb.pt", lambda n, d: d,
                              [(f"{root}/code/__torch__/bomb.py", b" " * (64 << 20))]),
                     ("bomb.py", "limit")),
        "lying-zip-size": (_rewrite(benign, tmp / "lying.pt", lambda n, d: d,
                                    [(f"{root}/code/__torch__/lying.py", b"#" * (16 << 20))]),
                           ("lying.py", "corrupt entry")),
        "too-many-entries": (_rewrite(benign, tmp / "entries.pt", lambda n, d: d,
                                      [(f"{root}/extra/x{i}", b"") for i in range(
                                          trust.MAX_ZIP_ENTRIES + 1)]),
                             ("entries", "limit")),
        # safetensors with lying headers
        "st-offsets-beyond-file": (_safetensors(tmp / "beyond.safetensors", {
            "w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}},
            b"\0" * 16), ("outside the file",)),
        "st-huge-header": (_safetensors(tmp / "huge.safetensors", b"{}", length=1 << 40),
                           ("header claims",)),
        "st-deep-header": (_safetensors(tmp / "deep_header.safetensors",
                                        ('{"w": ' + _deep(200_000) + "}").encode()),
                           ("deeper than",)),
        "st-deep-metadata": (_safetensors(tmp / "deep_meta.safetensors", {
            "__metadata__": {"trojanscan": _deep(200_000)},
            "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
            ("deeper than",)),
        "st-overlap": (_safetensors(tmp / "overlap.safetensors", {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
            ("share bytes",)),
        "st-bad-dtype": (_safetensors(tmp / "dtype.safetensors", {
            "a": {"dtype": "OBJECT", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
            ("unknown dtype",)),
        "st-duplicate-key": (_safetensors(tmp / "dupkey.safetensors",
                                          b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": '
                                          b'[0, 4]}, "a": {}}', b"\0" * 4), ("duplicate key",)),
    }
    _patch_declared_size(c["lying-zip-size"][0], "lying.py", 100)
    # pickles of every protocol, named as checkpoints and as safetensors
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        for suffix in (".pt", ".pth", ".safetensors"):
            path = _pickle(tmp / f"pickle{protocol}{suffix}", marker, protocol)
            c[f"pickle-{protocol}{suffix}"] = (path, ())
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Planted(m)}, tmp / "zip_pickle.pt")
    c["zip-pickle"] = (tmp / "zip_pickle.pt", ("refused",))
    return c


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    marker = tmp / "pwned"
    return _corpus(tmp, marker), marker


PAYLOADS = ["setstate-save", "forward-save", "from-file", "requires-grad", "grad-mode", "profiler",
            "call-counter", "setstate-replay", "print", "while-true", "crafted-aten-save", "custom-namespace",
            "late-torch-save", "late-print", "comprehension-shadows-ops", "bound-method",
            "bound-inplace-state", "list-alias-state", "for-alias-state", "scripted-helper-state",
            "helper-changes-buffer", "batch-norm-stats", "append-alias-state", "store-through-helper",
            "warn", "warn-forged-text", "st-lying-num-classes", "st-lying-input-shape",
            "ckpt-lying-num-classes",
            "profiler-op", "getattr-operator", "triple-quoted", "duplicate-entry", "zip-bomb",
            "lying-zip-size", "too-many-entries", "st-offsets-beyond-file", "st-huge-header",
            "st-deep-header", "st-deep-metadata", "st-overlap", "st-bad-dtype", "st-duplicate-key",
            "zip-pickle"] + [f"pickle-{p}{s}" for p in range(pickle.HIGHEST_PROTOCOL + 1)
                             for s in (".pt", ".pth", ".safetensors")]


def test_the_corpus_is_complete(corpus):
    files, _ = corpus
    assert sorted(files) == sorted(PAYLOADS) and len(PAYLOADS) >= 57


@pytest.mark.parametrize("name", PAYLOADS)
def test_every_payload_is_refused_in_one_line_and_never_runs(corpus, name):
    files, marker = corpus
    path, needles = files[name]
    with pytest.raises(TrojanscanError) as caught:
        load_model(path, arch="mnist-cnn", input_shape=SHAPE)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    for needle in needles:
        assert needle in message, (needle, message)
    assert not marker.exists(), f"{name} ran: the marker exists"


def test_a_forward_that_never_returns_is_refused_within_the_budget(tmp_path, marker, monkeypatch):
    monkeypatch.setattr(trust, "PROBE_CALL_BUDGET_S", 3.0)
    path = _script(NeverReturns(), tmp_path / "hang.pt")
    trust.inspect_torchscript(path)  # nothing to see statically: the loop's bound is the batch
    start = time.monotonic()
    with pytest.raises(TrojanscanError, match=r"hang.pt: refused: its forward did not return "
                                              r"within 3 s on a batch of 3"):
        load_model(path, input_shape=SHAPE)
    assert time.monotonic() - start < 3.0 + trust.PROBE_LOAD_BUDGET_S


def test_a_forward_that_hangs_only_on_a_batch_of_two_is_refused(tmp_path, monkeypatch):
    """check_model_fits runs a batch of 2 first: the probe tries that size too."""
    monkeypatch.setattr(trust, "PROBE_CALL_BUDGET_S", 3.0)
    path = _script(HangsOnTwo(), tmp_path / "hang2.pt")
    with pytest.raises(TrojanscanError, match=r"hang2.pt: refused: its forward did not return "
                                              r"within 3 s on a batch of 2"):
        load_model(path, input_shape=SHAPE)


def _confined(result: trust.ProbeResult) -> None:
    if "chroot" not in result.confinements:
        pytest.skip(f"the platform does not allow the probe's chroot ({result.not_applied})")


def test_the_probe_is_a_sandbox_a_truncating_write_cannot_reach_a_file(tmp_path):
    """Defence in depth: a writer that slipped past the inspection (here the check is skipped)
    runs in a process that sees only an empty folder, so the victim is not even truncated
    (RLIMIT_FSIZE alone lets open(O_TRUNC) through)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    path = _script(ForwardSave(str(victim)), tmp_path / "fwd.pt")
    result = None
    with contextlib.suppress(TrojanscanError):
        result = trust.probe_torchscript(path, SHAPE)
    assert victim.read_text() == "precious"
    if result is not None:
        _confined(result)


def test_the_probe_is_a_sandbox_a_shared_mapping_cannot_write_a_file(tmp_path):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"abcdefgh")
    path = _script(MmapWrite(str(victim)), tmp_path / "mmap.pt")
    with pytest.raises(TrojanscanError, match="from_file"):
        trust.inspect_torchscript(path)  # the checker refuses it; the probe is tried regardless
    result = None
    with contextlib.suppress(TrojanscanError):
        result = trust.probe_torchscript(path, SHAPE)
    assert victim.read_bytes() == b"abcdefgh"
    if result is not None:
        _confined(result)
        assert result.outcome != "ok"  # the file is not there to map


def test_the_probe_records_what_confined_it(tmp_path):
    path = _script(Benign("unused"), tmp_path / "benign.pt")
    result = trust.probe_torchscript(path, SHAPE)
    assert result.outcome == "ok" and result.batches == list(trust.PROBE_BATCH_SIZES)
    assert 2 in result.batches
    if sys.platform.startswith("linux"):
        assert {"RLIMIT_FSIZE", "RLIMIT_CORE", "RLIMIT_AS"} <= set(result.confinements)
    assert not set(result.confinements) & set(result.not_applied)


def test_a_probe_that_cannot_import_torch_is_a_setup_problem_not_the_files(tmp_path, monkeypatch):
    path = _script(Benign("unused"), tmp_path / "benign.pt")
    monkeypatch.setattr(sys, "path", ["/nonexistent-trojanscan-test"])
    with pytest.raises(TrojanscanError) as caught:
        trust.probe_torchscript(path, SHAPE)
    monkeypatch.undo()
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert "setup" in message and "not a loadable" not in message, message


def test_the_probe_keeps_the_loader_variables(monkeypatch):
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/cuda/lib64")
    monkeypatch.setenv("VIRTUAL_ENV", "/opt/venv")
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    env = trust._probe_env("/work")
    assert env["LD_LIBRARY_PATH"] == "/opt/cuda/lib64" and env["VIRTUAL_ENV"] == "/opt/venv"
    assert "SECRET_TOKEN" not in env and env["HOME"] == "/work"


def test_an_empty_operator_registry_fails_closed(tmp_path, monkeypatch):
    path = _script(Benign("unused"), tmp_path / "benign.pt")
    monkeypatch.setattr(trust, "_registered_operator_names", lambda: frozenset())
    with pytest.raises(TrojanscanError) as caught:
        trust.inspect_torchscript(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert "does not support torch" in message


def test_every_format_is_read_and_hashed_from_the_private_copy(tmp_path, monkeypatch):
    """What is checked is what is loaded and hashed: never the user's path, which could change."""
    read: list[str] = []
    real_load_file, real_torch_load, real_sha = model_io.load_file, torch.load, model_io.sha256_file
    monkeypatch.setattr(model_io, "load_file", lambda p, *a, **k: read.append(str(p))
                        or real_load_file(p, *a, **k))
    monkeypatch.setattr(torch, "load", lambda p, *a, **k: read.append(str(p))
                        or real_torch_load(p, *a, **k))
    monkeypatch.setattr(model_io, "sha256_file", lambda p: read.append(str(p)) or real_sha(p))
    model = build_model("mnist-cnn", 10, SHAPE).eval()
    st = save_model(model, tmp_path / "m.safetensors")
    ckpt = tmp_path / "m.pth"
    torch.save(model.state_dict(), ckpt)
    for path, kwargs in ((st, {}), (ckpt, {"arch": "mnist-cnn", "input_shape": SHAPE})):
        read.clear()
        loaded = load_model(path, **kwargs)
        assert len(read) == 2 and all(p != str(path) and "trojanscan-model-" in p for p in read), read
        assert loaded.sha256 == real_sha(path)


# --- what must still load -----------------------------------------------------------------------------


def _same_logits(eager: nn.Module, loaded: nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.rand(5, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), eager.eval()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,shape,k", [("mnist-cnn", (1, 16, 16), 10), ("gtsrb-cnn", (3, 32, 32), 43),
                                          ("cifar-cnn", (3, 32, 32), 10)])
def test_reference_nets_load_unchanged(tmp_path, arch, shape, k):
    model = build_model(arch, k, shape).eval()
    loaded = load_model(save_model(model, tmp_path / "m.pt"))
    assert loaded.format == "torchscript" and loaded.spec.arch == arch
    assert loaded.checked and not loaded.trusted and loaded.trust_label == "checked"
    assert loaded.inspection["code_files"] > 0 and loaded.inspection["operators"] > 0
    assert loaded.inspection["probe"]["outcome"] == "ok"
    assert loaded.trust_record()["inspection"]["probe"]["confinements"]
    _same_logits(model, loaded.module, shape)


@pytest.mark.parametrize("cls,export", [(ControlFlow, "script"), (TinyResNet, "script"),
                                        (TinyVGG, "script"), (TinyMobileNet, "script"),
                                        (TinyViT, "script"), (TinyResNet, "trace")])
def test_scripted_and_torchvision_style_models_load_unchanged(tmp_path, cls, export):
    torch.manual_seed(0)
    model = cls().eval()
    path = tmp_path / "m.pt"
    if export == "trace":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on constant branches
            torch.jit.trace(model, torch.rand(2, *SHAPE)).save(str(path))
    else:
        _script(model, path)
    loaded = load_model(path, input_shape=SHAPE)
    assert loaded.format == "torchscript" and loaded.trust_label == "checked"
    _same_logits(model, loaded.module, SHAPE)


def test_trusted_loads_what_the_checker_refuses_and_says_so(tmp_path):
    path = _script(GradBranch(), tmp_path / "own.pt")
    with pytest.raises(TrojanscanError, match="requires_grad"):
        load_model(path)
    loaded = load_model(path, trusted=True)
    assert loaded.trusted and not loaded.checked and loaded.trust_label == "trusted, unchecked"
    assert loaded.trust_record() == {"trusted": True, "checked": False,
                                     "trust": "trusted, unchecked"}
    assert loaded.module(torch.rand(2, *SHAPE)).shape == (2, 10)
    # a safetensors file is checked whether or not it is trusted
    st = save_model(build_model("mnist-cnn", 10, SHAPE), tmp_path / "m.safetensors")
    assert load_model(st, trusted=True).trust_label == "trusted, checked"


def test_allow_list_and_limits_are_documented_constants():
    assert trust.ALLOW_LIST_SIZE == len(trust.ALLOWED_ATEN) + len(trust.ALLOWED_PRIM) + len(
        trust.ALLOWED_BUILTINS)
    assert not {"save", "load", "from_file", "is_grad_enabled", "requires_grad"} & (
        trust.ALLOWED_ATEN | trust.ALLOWED_PRIM)
    assert json_depth(_deep(200_000), 32) == 33  # stops counting, never recurses


# --- the command line --------------------------------------------------------------------------------

CLI_PAYLOADS = ["setstate-save", "forward-save", "custom-namespace", "requires-grad", "pickle-2.pt",
                "pickle-0.pth", "pickle-5.safetensors", "st-deep-metadata", "zip-bomb", "late-torch-save",
                "st-lying-num-classes"]


@pytest.mark.parametrize("command", ["evaluate", "scan"])
def test_cli_refuses_payloads_with_one_line_and_exit_2(corpus, tmp_path, command):
    from trojanscan.cli import app

    files, marker = corpus
    runner = CliRunner()
    for name in CLI_PAYLOADS:
        path = files[name][0]
        args = [command, str(path), "--data", "digits"]
        if command == "scan":
            args += ["--out", str(tmp_path / f"scan-{name}")]
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (name, result.output)
        assert "Traceback" not in result.output and "Traceback" not in result.stderr
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and path.name in lines[0], (name, result.stderr)
        assert not marker.exists(), f"{name} ran through the CLI"


def test_cli_trust_model_is_explicit_and_recorded(trojaned_digits, tmp_path):
    """--trust-model loads a model the checker refuses, and every result says it was not checked."""
    from trojanscan.cli import app

    path = _script(GradBranch(), tmp_path / "own.pt")
    runner = CliRunner()
    refused = runner.invoke(app, ["evaluate", str(path), "--data", "digits"])
    assert refused.exit_code == 2 and "--trust-model" in refused.stderr
    ok = runner.invoke(app, ["evaluate", str(path), "--data", "digits", "--trust-model", "--json",
                             str(tmp_path / "ev.json")])
    assert ok.exit_code == 0, ok.output
    assert "not checked" in ok.stderr
    record = json.loads((tmp_path / "ev.json").read_text())
    assert record["model"]["trust"] == "trusted, unchecked" and record["model"]["checked"] is False
    # a scan of a checked model says so in scan.json and in the report
    good = save_model(trojaned_digits.model, tmp_path / "good.pt")
    scanned = runner.invoke(app, ["scan", str(good), "--data", "digits", "--clean-samples", "100",
                                  "--steps", "5", "--labels", "0,1,2", "--out", str(tmp_path / "s")])
    assert scanned.exit_code == 0, scanned.output
    result = json.loads((tmp_path / "s" / "scan.json").read_text())
    assert result["model_trust"]["trust"] == "checked"
    assert "Model file:</dt> <dd>checked" in (tmp_path / "s" / "report.html").read_text()


class OrdinaryNames(nn.Module):
    """Builtin and attribute names as ordinary variables: not a payload."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 10)

    def forward(self, input: Tensor) -> Tensor:
        data = input.flatten(1)
        max = self.fc(data)
        return torch.relu(max)


def test_ordinary_variable_names_are_not_refused(tmp_path):
    path = _script(OrdinaryNames(), tmp_path / "names.pt")
    assert load_model(path, input_shape=SHAPE).trust_label == "checked"
