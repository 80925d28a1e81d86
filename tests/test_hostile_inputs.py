"""Issue 21, as a hostile or careless user: bad option values, deeply nested JSON, folders in use.

Every case must end in a one-line error (exit code 2 from the CLI) or the normal result, never a
traceback. The corpus is built here; ``CORPUS`` counts its cases and outcomes (printed with -s).
"""

from __future__ import annotations

import inspect
import math
import os
import signal
import subprocess
import sys
import time
import typing
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

from trojanscan import build_model, load_dataset, save_model
from trojanscan.cli import app, numeric_options
from trojanscan.data.triggers import Trigger
from trojanscan.defenses.scan_result import LabelResult, ScanResult
from trojanscan.errors import TrojanscanError, TrojanscanWarning
from trojanscan.fileio import LOCK_FILE, MAX_RESULT_JSON_BYTES, folder_lock, save_npz_record
from trojanscan.models.wrappers import PLAIN_CONVENTION
from trojanscan.options import parse_options
from trojanscan.validation import OPTION_BOUNDS, SEED, Bounds, check_number

runner = CliRunner()
CORPUS: Counter = Counter()  # (kind of case, outcome) → count


@pytest.fixture(scope="module", autouse=True)
def _report_corpus():
    yield
    for (kind, outcome), n in sorted(CORPUS.items()):
        print(f"corpus: {kind}: {n} × {outcome}")
    print(f"corpus: {sum(CORPUS.values())} cases")


def commands(t: typer.Typer = app, path: tuple[str, ...] = ()):
    """(words of the command, its undecorated function) for every command of the app."""
    for c in t.registered_commands:
        yield (*path, c.name or c.callback.__name__.replace("_", "-")), c.callback
    for g in t.registered_groups:
        yield from commands(g.typer_instance, (*path, g.name))


def required_args(func, tmp: Path) -> list[str]:
    """Dummy values for a command's required arguments and options: names of files that do not
    exist, so that a value the checks let through fails fast on the missing file."""
    args, options = [], []
    for p in inspect.signature(inspect.unwrap(func)).parameters.values():
        info = p.default
        if getattr(info, "default", None) is not ... and p.name not in ("data", "out", "scan_path"):
            continue  # an optional --data, --out or --scan (bench zoo, demo, repair): never real work
        flag = next((d for d in getattr(info, "param_decls", None) or () if d.startswith("--")), None)
        value = "tbt" if p.name == "name" else str(tmp / f"nope-{p.name}")
        if flag is None:
            args.append(value)
        else:
            options += [flag, value]
    return args + options


def one_line_error(result) -> str:
    """The CLI's answer to a mistake: exit 2, no exception, exactly one line on stderr."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def bad_values(bounds: Bounds) -> list[str]:
    """Values just outside ``bounds``, non-finite or absurd ones, and text that is not a number."""
    if bounds.kind is int:
        low, high = int(bounds.low), int(bounds.high)
        return [str(low - 1), str(high + 1), str(2**63), str(-(2**63) - 1), str(10**30), "1e9", "abc"]
    values = ["nan", "inf", "-inf", "1e308", "-1e308", "abc", f"{bounds.high * 1.5 + 1:g}",
              f"{bounds.low - 1:g}"]
    values += [f"{bounds.low:g}"] if bounds.low_open else []
    values += [f"{bounds.high:g}"] if bounds.high_open else []
    return values


def edge_values(bounds: Bounds) -> list[str]:
    """The inclusive ends of ``bounds``: accepted."""
    text = (lambda v: f"{v:g}") if bounds.kind is float else (lambda v: str(int(v)))
    return ([] if bounds.low_open else [text(bounds.low)]) + ([] if bounds.high_open else [text(bounds.high)])


# --- 1. numeric options ----------------------------------------------------------------------------


def test_every_numeric_option_of_every_command_is_bounded():
    found = 0
    for words, func in commands():
        assert hasattr(func, "__wrapped__"), f"{' '.join(words)} is not wrapped by friendly_errors"
        hints = typing.get_type_hints(inspect.unwrap(func))
        numeric = {n for n, h in hints.items() if h in (int, float)}
        flags = numeric_options(inspect.unwrap(func))
        assert set(flags) == numeric and all(f in OPTION_BOUNDS for f in flags.values()), words
        found += len(flags)
    assert found >= 40  # 49 when written: a command that loses its options would show here


def test_bad_numeric_option_values_are_one_line_errors_naming_the_option(tmp_path):
    for words, func in commands():
        base = [*words, *required_args(func, tmp_path)]
        for flag in numeric_options(inspect.unwrap(func)).values():
            bounds = OPTION_BOUNDS[flag]
            if bounds is None:
                continue
            for value in bad_values(bounds):
                line = one_line_error(runner.invoke(app, [*base, flag, value]))
                assert f"'{flag}'" in line or line.startswith(f"error: {flag} "), (words, flag, value, line)
                CORPUS["bad option value", "one-line error naming the option"] += 1


def test_edge_values_pass_the_check(tmp_path):
    """The inclusive ends are accepted: the command goes on and stops at the missing file instead."""
    for words, func in commands():
        if words == ("demo",):  # no file to stop at: it would train
            continue
        base = [*words, *required_args(func, tmp_path)]
        for flag in numeric_options(inspect.unwrap(func)).values():
            for value in edge_values(OPTION_BOUNDS[flag]) if OPTION_BOUNDS[flag] else []:
                line = one_line_error(runner.invoke(app, [*base, flag, value]))
                assert flag not in line and "nope-" in line, (words, flag, value, line)
                CORPUS["edge option value", "accepted (then a one-line error on the missing file)"] += 1


@pytest.mark.parametrize("args, needle", [
    (["scan", "m", "--data", "d", "--out", "o", "--option", "threshold=nan"], "threshold"),
    (["scan", "m", "--data", "d", "--out", "o", "--option", "threshold=inf"], "threshold"),
    (["scan", "m", "--data", "d", "--out", "o", "--option", "threshold=1e308"], "option threshold"),
    (["scan", "m", "--data", "d", "--out", "o", "--option", "threshold=0"], "option threshold"),
    (["scan", "m", "--data", "d", "--out", "o", "--option", "seed=9223372036854775808"], "option seed"),
    (["scan", "m", "--data", "d", "--out", "o", "--option", "seed=-1"], "option seed"),
    (["scan", "m", "--data", "d", "--out", "o", "--option", "steps=0"], "option steps"),
    (["scan", "m", "--data", "d", "--out", "o", "--option", f"steps={10**30}"], "option steps"),
    (["scan", "m", "--data", "d", "--out", "o", "--option", "chunk=-3"], "option chunk"),
    (["scan", "m", "--data", "d", "--out", "o", "--method", "tabor", "--option", "weights.alone=nan"],
     "alone"),
    (["scan", "m", "--data", "d", "--out", "o", "--method", "tabor", "--tabor-weights", "crop=-inf"],
     "crop"),
    (["scan", "m", "--data", "d", "--out", "o", "--mean", "nan", "--std", "0.5"], "--mean"),
    (["scan", "m", "--data", "d", "--out", "o", "--mean", "0.5", "--std", "inf"], "--std"),
    (["train", "--data", "d", "--out", "o.pt", "--attack", "badnets", "--option", f"size={10**20}"],
     "option size"),
    (["train", "--data", "d", "--out", "o.pt", "--attack", "badnets", "--option", "poison_rate=2"],
     "option poison_rate"),
    (["train", "--data", "d", "--out", "o.pt", "--attack", "blend", "--option", "alpha=nan"], "alpha"),
    (["attack", "finetune", "--model", "m", "--data", "d", "--out", "o.pt", "--option", "lr=inf"],
     "lr"),
    (["attack", "finetune", "--model", "m", "--data", "d", "--out", "o.pt", "--option", "epochs=0"],
     "option epochs"),
])
def test_bad_method_option_values_are_one_line_errors(args, needle):
    line = one_line_error(runner.invoke(app, args))
    assert needle in line, line
    CORPUS["bad --option/--mean/--std value", "one-line error naming the option"] += 1


def test_checks_of_numbers_outside_the_cli():
    from trojanscan.defenses.strip import parse_temperature

    assert parse_temperature("1000") == 1000.0 and parse_temperature("auto") == "auto"
    for value in (math.nan, math.inf, 1e308, 0, -1, True, "3e3", "nan", "hot"):
        with pytest.raises(TrojanscanError, match="temperature"):
            parse_temperature(value)
        CORPUS["bad STRIP temperature (API)", "one-line error"] += 1
    for seed, problem in ((2**63, "<= 9223372036854775807"), (-1, ">= 0"), (1.5, "a whole number from 0 to"),
                          (True, "a whole number from 0 to")):
        with pytest.raises(TrojanscanError, match=f"^seed must be {problem}"):
            check_number("seed", seed, SEED)
        CORPUS["bad seed (API)", "one-line error"] += 1
    from trojanscan.models.wrappers import wrap_normalization
    with pytest.raises(TrojanscanError, match="need 1 value for 1-channel images, got 2 and 2"):
        wrap_normalization(object(), [0.5, 0.5], [0.5, 0.5], 1)
    with pytest.raises(TrojanscanError, match="need 1 or 3 values for 3-channel images, got 2 and 1"):
        wrap_normalization(object(), [0.5, 0.5], [0.5], 3)
    from trojanscan.defenses.neural_cleanse import NeuralCleanseOptions
    assert parse_options(NeuralCleanseOptions, ["threshold=3", "seed=7"]) == {"threshold": 3.0, "seed": 7}


# --- 2. JSON from files a stranger may hand us -----------------------------------------------------

DEEP = 200_000


def _deep_list(n: int = DEEP) -> str:
    return "[" * n + "]" * n


def _deep_dict(n: int = DEEP // 2) -> str:  # 700 kB: under the 1 MB cap of model metadata
    return '{"a": ' * n + "1" + "}" * n


def _small_scan(out: Path, warning: str = "") -> ScanResult:
    """A three-label scan result written to ``out``, built without a model."""
    labels = [LabelResult(label=k, l1_norm=float(10 + k), attack_success_rate=1.0, converged=True,
                          steps=3, image_passes=96, seconds=0.1, stop_reason="patience", final_cost=1e-3,
                          mask=torch.full((4, 4), 0.1 * k), pattern=torch.zeros(1, 4, 4))
              for k in range(3)]
    result = ScanResult(method="neural-cleanse", labels=labels, flagged_labels=[], infected=False,
                        anomaly_index=0.5, threshold=2.0, median_l1=11.0, mad=1.0,
                        parameters={"fingerprint": "f" * 64}, seed=0, model_sha256="m" * 64,
                        data_sha256="d" * 64, seconds=0.3, input_convention=PLAIN_CONVENTION,
                        warnings=[warning] if warning else [])
    result.save(out)
    return result


def _scan_json_case(tmp: Path, name: str, text: str | None) -> Path:
    """A copy of a good scan folder whose scan.json is replaced by ``text`` (None: a sparse file
    over the size cap)."""
    folder = tmp / name
    _small_scan(folder)
    path = folder / "scan.json"
    if text is None:
        with open(path, "wb") as f:
            f.truncate(MAX_RESULT_JSON_BYTES + 1)
    else:
        path.write_text(text)
    return folder


def test_deep_or_damaged_scan_results_are_refused_in_one_line(tmp_path):
    cases = {
        "deep-list": (_deep_list(), "nests deeper than 32 levels"),
        "deep-dict": (_deep_dict(), "nests deeper than 32 levels"),
        "deep-33": (_deep_list(33), "nests deeper than 32 levels"),
        "huge": (None, "bytes (limit"),
        "duplicate-key": ('{"method": "a", "method": "b"}', "duplicate key"),
        "not-json": ("{'method': nan", "not valid JSON"),
        "a-list": ("[1, 2, 3]", "incomplete scan result"),
        "wrong-types": ('{"parameters": [], "labels": 3}', "incomplete scan result"),
        "empty": ("", "not valid JSON"),
    }
    for name, (text, needle) in cases.items():
        folder = _scan_json_case(tmp_path, name, text)
        with pytest.raises(TrojanscanError) as e:
            ScanResult.load(folder)
        message = str(e.value)
        assert "scan.json" in message and needle in message and "\n" not in message, (name, message)
        CORPUS["damaged scan.json", "one-line error naming the file"] += 1
    # brackets inside strings are text, not nesting: such a file is read as it was written
    _small_scan(tmp_path / "brackets", warning="[{" * 50_000)
    assert ScanResult.load(tmp_path / "brackets").warnings == ["[{" * 50_000]
    CORPUS["scan.json with brackets in its strings", "normal result"] += 1


def test_deep_side_files_are_refused_or_redone(tmp_path):
    from trojanscan.defenses.scan import _drop_stale_result
    from trojanscan.defenses.scan_result import label_file, load_label
    from trojanscan.workflows.records import MITIGATION_JSON, mitigation_records

    # mitigation.json: a damaged one only held summaries, so it counts as none
    folder = tmp_path / "mitigated"
    _small_scan(folder)
    for text in (_deep_list(), _deep_dict(), '{"a": 1, "a": 2}'):
        (folder / MITIGATION_JSON).write_text(text)
        assert mitigation_records(folder, "f" * 64) == {}
        CORPUS["damaged mitigation.json", "ignored (no earlier repairs)"] += 1
    # a stale scan.json about to be replaced by a rerun
    (folder / "scan.json").write_text(_deep_list())
    _drop_stale_result(folder, "another fingerprint")
    assert not (folder / "scan.json").exists()
    CORPUS["deep stale scan.json on rerun", "removed, scan redone"] += 1
    # a label file whose record nests deep: the label is not done (redone by a rerun) ...
    folder = tmp_path / "labels"
    _small_scan(folder)
    save_npz_record(label_file(folder, 1), {"mask": np.zeros((4, 4), np.float32),
                                            "pattern": np.zeros((1, 4, 4), np.float32),
                                            "record": _deep_list()})
    assert load_label(label_file(folder, 1), "f" * 64) is None
    CORPUS["deep label record", "label redone"] += 1
    # ... and a finished scan that needs it says so in one line
    with pytest.raises(TrojanscanError, match=r"label_001.npz: missing, damaged or from another scan"):
        ScanResult.load(folder)
    CORPUS["scan.json whose label file is deep", "one-line error naming the file"] += 1
    # a trigger file whose parameters nest deep
    trig = tmp_path / "deep.trigger.npz"
    save_npz_record(trig, {"mask": np.zeros((4, 4), np.float32), "pattern": np.zeros((1, 4, 4), np.float32),
                           "target": np.int64(0), "kind": "patch", "params": _deep_list()})
    with pytest.raises(TrojanscanError, match=r"deep.trigger.npz: refused: its trigger parameters nest"):
        Trigger.load(trig)
    CORPUS["deep trigger parameters", "one-line error naming the file"] += 1


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_deep_model_metadata_is_refused_by_every_command(tmp_path):
    model = build_model("mnist-cnn", 10, (1, 16, 16))
    files = {}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for name, meta in (("deep-list", _deep_list()), ("deep-dict", _deep_dict())):
        files[f"{name}.safetensors"] = tmp_path / f"{name}.safetensors"
        save_file(state, str(files[f"{name}.safetensors"]), metadata={"trojanscan": meta})
        files[f"{name}.pt"] = tmp_path / f"{name}.pt"
        torch.jit.script(model).save(str(files[f"{name}.pt"]), _extra_files={"trojanscan.json": meta})
    scan = tmp_path / "scan"
    _small_scan(scan)
    for path in files.values():
        for args in (["evaluate", str(path), "--data", "digits"],
                     ["scan", str(path), "--data", "digits", "--out", str(tmp_path / "out")],
                     ["repair", str(path), "--scan", str(scan), "--data", "digits", "--out",
                      str(tmp_path / "r.pt")],
                     ["strip", "calibrate", str(path), "--data", "digits", "--out", str(tmp_path / "c.npz")]):
            line = one_line_error(runner.invoke(app, args))
            assert path.name in line and "nests deeper than 32 levels" in line, (args, line)
            CORPUS["deep model metadata", "one-line error naming the file"] += 1


def test_a_deep_scan_json_stops_repair_and_filter_in_one_line(tmp_path):
    model = save_model(build_model("mnist-cnn", 10, (1, 16, 16)), tmp_path / "m.safetensors")
    scan = _scan_json_case(tmp_path, "deep", _deep_list())
    for args in (["repair", str(model), "--scan", str(scan), "--data", "digits", "--out",
                  str(tmp_path / "r.safetensors")],
                 ["filter", str(model), "--scan", str(scan / "scan.json"), "--data", "digits", "--out",
                  str(tmp_path / "f.npz")]):
        line = one_line_error(runner.invoke(app, args))
        assert "scan.json: refused: its scan result nests deeper than 32 levels" in line, line
        CORPUS["deep scan.json given to repair/filter", "one-line error naming the file"] += 1


# --- 3. a folder in use, a lock or temporary files left by a killed run, SIGTERM ------------------

HOLD = """
import sys, time
from trojanscan.fileio import folder_lock
with folder_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def _commands_writing_into(folder: Path, tmp: Path) -> list[list[str]]:
    """Every command that writes into a folder, pointed at ``folder``, with inputs that do not exist:
    the folder's lock is the first thing each checks."""
    missing = str(tmp / "nope.safetensors")
    return [
        ["scan", missing, "--data", "digits", "--out", str(folder)],
        ["scan", missing, "--data", "digits", "--out", str(folder), "--repeats", "2"],
        ["repair", missing, "--scan", str(folder), "--data", "digits", "--out", str(tmp / "r.pt")],
        ["filter", missing, "--scan", str(folder / "scan.json"), "--data", "digits", "--out",
         str(tmp / "f.npz")],
        ["strip", "evaluate", missing, "--data", "digits", "--out", str(folder)],
        ["demo", "--out", str(folder)],
        ["bench", "zoo", "--out", str(folder), "--data", str(tmp / "nope.npz")],
    ]


def test_a_folder_in_use_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for args in _commands_writing_into(folder, tmp_path):
            line = one_line_error(runner.invoke(app, args))
            assert f"{folder}:" in line and "in use by another trojanscan command" in line, (args, line)
            assert f"pid {holder.pid} on " in line, line
            CORPUS["command into a folder held by another process", "one-line error"] += 1
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock is stale now, and the next command takes it over
    assert (folder / LOCK_FILE).is_file()
    result = runner.invoke(app, ["strip", "evaluate", str(tmp_path / "nope.pt"), "--data", "digits",
                                 "--out", str(folder)])
    assert f"took over the lock of pid {holder.pid}" in result.stdout, result.stdout
    assert "nope.pt" in one_line_error(result) and not (folder / LOCK_FILE).exists()
    CORPUS["command into a folder with a stale lock", "taken over with a warning"] += 1


def test_locks_within_one_process_and_stale_ones(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    with folder_lock(folder):  # a second command in the same process is refused too
        assert (folder / LOCK_FILE).read_text().split()[0] == str(os.getpid())
        for args in _commands_writing_into(folder, tmp_path):
            assert "in use by another trojanscan command" in one_line_error(runner.invoke(app, args))
            CORPUS["command into a folder held in this process", "one-line error"] += 1
    assert not (folder / LOCK_FILE).exists()
    # a lock whose process is gone, an empty one left before its pid was written, a garbled one
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    old = time.time() - 3600
    for content in (f"{dead} somehost {old:.0f}\n", "", "garbage \x00\x01 [red]x[/red]\n"):
        (folder / LOCK_FILE).write_text(content)
        os.utime(folder / LOCK_FILE, (old, old))
        with pytest.warns(TrojanscanWarning, match="took over the lock of .*no longer running"):
            with folder_lock(folder):
                assert (folder / LOCK_FILE).read_text().split()[0] == str(os.getpid())
        assert not (folder / LOCK_FILE).exists()
        CORPUS["stale lock file", "taken over with a warning"] += 1
    # an empty lock file just made is its owner's, about to be written: in use
    (folder / LOCK_FILE).write_text("")
    with pytest.raises(TrojanscanError, match="in use by another trojanscan command"):
        with folder_lock(folder):
            pass
    CORPUS["lock file being created", "one-line error"] += 1
    # a folder that does not exist is not created by a command that fails, nor by a mitigation
    assert "nope.pt" in one_line_error(runner.invoke(app, ["scan", str(tmp_path / "nope.pt"), "--data",
                                                            "digits", "--out", str(tmp_path / "new")]))
    assert not (tmp_path / "new").exists()
    with folder_lock(tmp_path / "absent", create=False):
        assert not (tmp_path / "absent").exists()


def test_stale_temporary_files_are_removed_when_the_folder_is_reopened(tmp_path):
    folder = tmp_path / "scan"
    _small_scan(folder)
    stale = [folder / ".scan.json.k3j2.tmp", folder / "labels" / ".label_001.npz.x8.tmp",
             folder / "seed-3" / ".scan.json.q.tmp", folder / ".model.safetensors.tmp"]
    busy = folder / "seed-4"
    busy.mkdir()
    kept = [folder / "notes.tmp", folder / "labels" / "label_001.npz", busy / ".scan.json.b.tmp"]
    kept.append(folder / ".model.safetensors.w1.tmp")  # `train --out` writing into the folder now
    with folder_lock(busy):  # another command's folder: the temporary file it is writing is its own
        for p in [*stale, *kept]:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(p.read_bytes() if p.exists() else b"half a file")
            if p in stale or p.parent == busy:  # left by a run killed an hour ago
                os.utime(p, (time.time() - 3600, time.time() - 3600))
        with folder_lock(folder):
            pass
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    CORPUS["stale .tmp files", "removed on reopening"] += len(stale)
    assert ScanResult.load(folder).flagged_labels == []  # the scan itself is untouched


class Centroids(torch.nn.Module):
    """The nearest class mean: a digits classifier (about 89% accurate) without any training."""

    def __init__(self, means: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(2 * means)
        self.b = torch.nn.Parameter(-(means * means).sum(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w.t() + self.b


@pytest.fixture(scope="module")
def centroid_model(tmp_path_factory):
    data = load_dataset("digits")
    x, y = data.x_train.flatten(1), data.y_train
    path = tmp_path_factory.mktemp("centroids") / "centroids.pt"
    torch.jit.script(Centroids(torch.stack([x[y == k].mean(0) for k in range(10)]))).save(str(path))
    return path


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_a_killed_scan_keeps_its_labels_and_the_rerun_finishes(centroid_model, tmp_path, monkeypatch, sig,
                                                               code, word):
    import trojanscan.defenses.scan as scan_module

    out = tmp_path / "scan"
    args = ["scan", str(centroid_model), "--data", "digits", "--out", str(out), "--chunk", "1",
            "--steps", "30", "--clean-samples", "200", "--labels", "0,1,2,3"]
    save_label = scan_module.save_label
    kills = []

    def save_then_kill(*a, **k):  # the signal arrives right after the first label is written
        save_label(*a, **k)
        kills.append(signal.getsignal(sig))
        os.kill(os.getpid(), sig)

    monkeypatch.setattr(scan_module, "save_label", save_then_kill)
    # Ctrl-C as a fresh `trojanscan` process meets it: Python's own SIGINT handler (an earlier test in
    # this process, or a library it loaded, may have left another one)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        handler = signal.getsignal(signal.SIGTERM)
        result = runner.invoke(app, args)
    finally:
        signal.signal(signal.SIGINT, before)
    assert signal.getsignal(signal.SIGTERM) is handler  # the command's own handler is gone again
    assert result.exit_code == code and result.stderr.strip() == (
        f"{word}; finished work is saved, rerun the same command to resume"), (kills, result.output)
    assert [p.name for p in out.glob("labels/label_*.npz")] == ["label_000.npz"]
    assert not (out / LOCK_FILE).exists() and not list(out.rglob("*.tmp"))
    CORPUS[f"scan stopped by {sig.name} after a label", f"one line, exit {code}, the label kept"] += 1
    monkeypatch.setattr(scan_module, "save_label", save_label)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("labels/label_*.npz"))) == 4 and (out / "scan.json").is_file()
    whole = tmp_path / "whole"
    assert runner.invoke(app, [*args[:5], str(whole), *args[6:]]).exit_code == 0
    assert ScanResult.load(out).to_dict(timings=False) == ScanResult.load(whole).to_dict(timings=False)
    CORPUS["rerun after the stop", "the uninterrupted result, every field but timings"] += 1


# --- 4. saved state edited or damaged: redone or refused, never used -----------------------------

def _edit_member(path: Path, key: str, edit) -> None:
    """Change one member of an .npz in place, keeping every other member (the checksum included)."""
    with np.load(path) as z:
        fields = {k: z[k] for k in z.files}
    fields[key] = np.asarray(edit(fields[key]))
    np.savez(path, **fields)


def test_an_edited_label_file_is_searched_again(centroid_model, tmp_path):
    import json

    out = tmp_path / "scan"
    args = ["scan", str(centroid_model), "--data", "digits", "--out", str(out), "--steps", "30",
            "--clean-samples", "200", "--labels", "0,1,2,3"]
    assert runner.invoke(app, args).exit_code == 0
    before = ScanResult.load(out).to_dict(timings=False)
    label = out / "labels" / "label_002.npz"
    _edit_member(label, "record", lambda r: json.dumps({**json.loads(str(r)), "l1_norm": 0.01}))
    result = runner.invoke(app, args)  # the rerun must not take the edited norm as a finished label
    assert result.exit_code == 0, result.output
    assert ScanResult.load(out).to_dict(timings=False) == before
    CORPUS["label file edited (norm set to 0.01)", "searched again, same result"] += 1
    _edit_member(label, "mask", lambda m: m * 0)
    with pytest.raises(TrojanscanError, match="label_002.npz: missing, damaged"):
        ScanResult.load(out)  # reading the finished scan refuses it in one line
    CORPUS["label file edited after the scan", "one line: rerun the scan"] += 1


def test_edited_filters_and_calibrations_are_refused(trojaned_digits, digits, tmp_path):
    from trojanscan.defenses.input_filter import InputFilter
    from trojanscan.defenses.strip import Strip

    model, trigger = trojaned_digits.model, trojaned_digits.trigger
    guards = {"filter": InputFilter(model).fit(digits.x_train[:300], [trigger]),
              "strip": Strip(model, n=8).calibrate(digits.x_train[:300])}
    edits = {"filter": ("threshold", lambda t: np.float64(1e30)),
             "strip": ("boundary_value", lambda b: np.float64(-1.0))}
    for name, guard in guards.items():
        path = tmp_path / f"{name}.npz"
        guard.save(path)
        key, edit = edits[name]
        _edit_member(path, key, edit)
        with pytest.raises(TrojanscanError) as bad:
            type(guard).load(path, model)
        assert "does not match its checksum" in str(bad.value) and "\n" not in str(bad.value)
        CORPUS[f"{name} file edited to pass every input", "one line: refused"] += 1


# --- 5. files that declare more than they hold: refused before anything is allocated -------------

def _npy_header(shape, dtype=np.uint8) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue()


def _idx(path: Path, dims, payload: bytes, compress: bool = False) -> Path:
    import gzip
    import struct

    data = (0x803).to_bytes(4, "big") + struct.pack(f">{len(dims)}I", *dims) + payload
    path.write_bytes(gzip.compress(data, 9) if compress else data)
    return path


def hostile_files(tmp: Path) -> dict[str, tuple[str, str]]:
    """case → (loader, path): files whose headers or archives claim far more than they hold."""
    import gzip
    import zipfile

    cases: dict[str, tuple[str, str]] = {}
    small, labels = np.zeros((2, 4, 4, 1), np.uint8), np.zeros(2, np.int64)
    np.savez(tmp / "huge_npz.npz", x_train=small, y_train=labels, x_test=small, y_test=labels)
    with zipfile.ZipFile(tmp / "huge_npz.npz", "a") as z:  # a second x_train claiming 10^12 images
        with pytest.warns(UserWarning, match="Duplicate name"):
            z.writestr("x_train.npy", _npy_header((10**12, 28, 28, 1)) + small.tobytes())
    cases["npz member declaring 10^12 images"] = ("dataset", str(tmp / "huge_npz.npz"))
    with zipfile.ZipFile(tmp / "many.npz", "w") as z:  # 5,000 arrays: the directory alone is the attack
        for i in range(5000):
            z.writestr(f"a{i}.npy", _npy_header((1,)) + b"\0")
    cases["npz of 5,000 arrays"] = ("inputs", str(tmp / "many.npz"))
    (tmp / "huge.npy").write_bytes(_npy_header((10**9, 3, 32, 32)) + b"\0" * 64)
    cases[".npy declaring 3×10^12 bytes"] = ("inputs", str(tmp / "huge.npy"))
    with zipfile.ZipFile(tmp / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:  # 3 MB of zeros per MB stored
        z.writestr("x.npy", _npy_header((3 << 20,)) + b"\0" * (3 << 20))
    cases["npz member inflating 3000x"] = ("inputs-capped", str(tmp / "bomb.npz"))
    for name, dims in {"overflow": (1 << 22, 1 << 21, 1 << 21), "huge": (60000, 65535, 65535)}.items():
        folder = tmp / f"idx_{name}"
        folder.mkdir()
        _idx(folder / "train-images-idx3-ubyte", dims, b"\0" * 64)
        cases[f"IDX header of {dims} images"] = ("dataset", str(folder))
    folder = tmp / "idx_gzip"
    folder.mkdir()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress((0x803).to_bytes(4, "big") + (3 << 20).to_bytes(4, "big") + (1).to_bytes(4, "big") * 2
                      + b"\0" * (3 << 20), 9))
    cases["gzip IDX inflating 3 MB, over the cap"] = ("dataset-capped", str(folder))
    folder = tmp / "idx_tail"
    folder.mkdir()
    _idx(folder / "train-images-idx3-ubyte.gz", (2, 4, 4), b"\0" * (32 + (8 << 20)), compress=True)
    cases["gzip IDX with 8 MB after its images"] = ("dataset", str(folder))
    w = torch.zeros(1000)
    legacy = tmp / "legacy.pt"
    torch.save({"w": w}, legacy, _use_new_zipfile_serialization=False)
    raw = legacy.read_bytes()
    legacy.write_bytes(raw.replace(b"M\xe8\x03", b"J\x00\x00\x00\x40", 1))  # 1000 → 2^30 floats
    cases["legacy checkpoint claiming 4 GB"] = ("model", str(legacy))
    zipped = tmp / "zipped.pt"
    torch.save({"w": torch.zeros(1 << 20)}, zipped)
    with zipfile.ZipFile(zipped) as src, zipfile.ZipFile(tmp / "bomb.pt", "w") as dst:
        for info in src.infolist():
            kind = zipfile.ZIP_STORED if info.filename.endswith((".pkl", "version", "byteorder")) else \
                zipfile.ZIP_DEFLATED
            dst.writestr(info.filename, src.read(info), compress_type=kind)
    cases["checkpoint tensor deflated 1000x"] = ("model", str(tmp / "bomb.pt"))
    return cases


LOAD_UNDER_LIMIT = """
import resource, sys, json
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
import os
from trojanscan.errors import TrojanscanError
from trojanscan.data.dataset import load_dataset
from trojanscan.data.images import read_inputs
from trojanscan.models.io import load_model
out = {}
for case, (loader, path) in json.loads(sys.argv[1]).items():
    os.environ.pop("TROJANSCAN_MAX_ARRAY_BYTES", None)
    if loader.endswith("-capped"):
        os.environ["TROJANSCAN_MAX_ARRAY_BYTES"] = str(1 << 20)
        loader = loader[:-len("-capped")]
    try:
        {"dataset": load_dataset, "inputs": read_inputs, "model": load_model}[loader](path)
        out[case] = "loaded"
    except TrojanscanError as e:
        out[case] = "one line: " + str(e) if "\\n" not in str(e) else "several lines"
    except BaseException as e:
        out[case] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def test_files_that_claim_more_than_they_hold_are_refused_under_a_memory_limit(tmp_path):
    import json

    cases = hostile_files(tmp_path)
    proc = subprocess.run([sys.executable, "-c", LOAD_UNDER_LIMIT, json.dumps(cases)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    outcomes = json.loads(proc.stdout.splitlines()[-1])
    for case, outcome in outcomes.items():
        assert outcome.startswith("one line: "), (case, outcome)
        CORPUS[case, "one line under a 3 GiB address-space limit"] += 1
    assert "over the limit" in outcomes["npz member inflating 3000x"]
    assert "unexpected bytes" in outcomes["gzip IDX with 8 MB after its images"]
    assert "zip bomb" in outcomes["checkpoint tensor deflated 1000x"]


def test_a_full_disk_names_the_file_being_written(tmp_path, monkeypatch):
    import errno

    from trojanscan.fileio import write_json

    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as e:
        write_json(tmp_path / "scan.json", {"a": 1})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert e.value.filename == str(tmp_path / "scan.json") and e.value.errno == errno.ENOSPC
    assert not list(tmp_path.iterdir()), "the temporary file is removed"
    CORPUS["disk full while writing", "the error names the file, no temporary left"] += 1
