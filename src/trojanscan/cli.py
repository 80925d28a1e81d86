"""The ``trojanscan`` command: thin wrappers that parse options and call the Python API."""

from __future__ import annotations

import functools
import inspect
import math
import signal
import sys
import threading
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from trojanscan._version import __version__
from trojanscan.api import (
    ScanResult,
    attack_model,
    audit,
    build_filter,
    evaluate_file,
    filter_check,
    guard_calibrate,
    guard_check,
    guard_evaluate,
    repair,
    scan,
    scan_repeated,
    strip_calibrate,
    strip_check,
    strip_evaluate,
    train_and_save,
)
from trojanscan.attacks import ModelAttack, PoisoningAttack, attacks_of_kind
from trojanscan.bench.zoo import DEFAULT_DATASETS, ZooOptions, run_zoo
from trojanscan.bench.zoo import METHODS as ZOO_METHODS
from trojanscan.bench.zoo_spec import MORE_ATTACKS as MORE_ZOO_ATTACKS
from trojanscan.data.images import RunInputs, read_inputs
from trojanscan.defenses.registry import GUARDS, REVERSERS, reverser
from trojanscan.devices import DEVICE_HELP, PRECISION_HELP
from trojanscan.errors import TrojanscanError, TrojanscanWarning
from trojanscan.fileio import folder_lock
from trojanscan.models import ARCH_HELP, ARCHITECTURES
from trojanscan.options import describe_options, option_fields, parse_options
from trojanscan.report.audit_html import labels_text
from trojanscan.report.html import evidence_strength, score_phrase, size_ratio_text, verdict_banner
from trojanscan.report.progress import set_quiet
from trojanscan.validation import OPTION_BOUNDS, check_option

console = Console(soft_wrap=True)  # a line is one line, also when piped
err_console = Console(stderr=True)


# the parser's exception base: click's, or the copy of click that newer typers carry
_PARSER_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class OneLineErrors(typer.core.TyperGroup):
    """The app's group: a mistake the parser finds (an unknown option, a value that is not a number,
    a missing option) is one line on stderr and exit code 2, like every other user mistake."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except _PARSER_ERROR as e:
            if type(e).__name__ != "NoArgsIsHelpError":  # its help is already shown
                err_console.print(f"[red]error:[/red] {escape(e.format_message())}", highlight=False,
                                  soft_wrap=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            err_console.print("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _hide_flag_types() -> None:
    """Show no ``<bool>`` beside an on/off flag in ``--help`` (typer 0.2x prints one): a flag takes no
    value, and ``--quiet <bool>`` reads as if it did. Other typers are left as they are."""
    option = getattr(typer.core, "TyperOption", None)
    shown = getattr(option, "display_type_rich", None)
    if shown is None or getattr(shown, "_flags_hidden", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        flag = getattr(self, "is_flag", False) and not getattr(self, "count", False)
        return None if flag else shown(self, ctx)

    display_type_rich._flags_hidden = True  # type: ignore[attr-defined]
    option.display_type_rich = display_type_rich  # type: ignore[union-attr]


_hide_flag_types()
app = typer.Typer(add_completion=False, no_args_is_help=True, cls=OneLineErrors,
                  help="Audit neural networks for backdoors (trojans) and repair them.")
F = TypeVar("F", bound=Callable[..., Any])
QUIET_HELP = "print only results, report paths and warnings: no progress bars, no narration"
_quiet = False


def say(*objects: Any, **kwargs: Any) -> None:
    """Print what helps a person follow along but is not a result (silent with --quiet)."""
    if not _quiet:
        console.print(*objects, **kwargs)


def warn(message: str) -> None:
    """A warning beside the results (shown even with --quiet)."""
    console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False)


def _version(value: bool) -> None:
    if value:
        console.print(f"trojanscan {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="print the version and exit")) -> None:
    """Audit neural networks for backdoors (trojans) and repair them."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program stands so that it unwinds as after Ctrl-C."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def _show_warning(fallback: Callable[..., None], message: Warning | str, category: type[Warning],
                  *args: Any, **kwargs: Any) -> None:
    """Our warnings in one line beside the results; others as Python shows them (``fallback``)."""
    if issubclass(category, TrojanscanWarning):
        warn(str(message))
    else:
        fallback(message, category, *args, **kwargs)


def numeric_options(func: Callable[..., Any]) -> dict[str, str]:
    """Parameter name → flag of each int or float option of a command; every one must have bounds
    in :data:`~trojanscan.validation.OPTION_BOUNDS` (checked when the command is defined)."""
    hints = typing.get_type_hints(func)
    found = {}
    for p in inspect.signature(func).parameters.values():
        if hints.get(p.name) not in (int, float):
            continue
        flag = next((d for d in getattr(p.default, "param_decls", None) or () if d.startswith("--")), None)
        if flag not in OPTION_BOUNDS:
            raise RuntimeError(f"{func.__name__}: numeric option {flag or p.name} has no bounds in "
                               "trojanscan.validation.OPTION_BOUNDS")
        found[p.name] = flag
    return found


def friendly_errors(func: F) -> F:
    """Check the command's numeric options, then run it: a user mistake becomes one line on stderr
    and exit code 2, never a traceback; Ctrl-C and SIGTERM keep the finished work and exit 130 and
    143. Also gives the command a ``--quiet`` option (no progress bars, no narration)."""
    numbers = numeric_options(func)

    @functools.wraps(func)
    def wrapper(*args: Any, quiet: bool = False, **kwargs: Any) -> Any:
        global _quiet
        _quiet = quiet
        set_quiet(quiet)
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", TrojanscanWarning)
                warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
                for name, flag in numbers.items():
                    kwargs[name] = check_option(flag, kwargs.get(name))
                return func(*args, **kwargs)
        except TrojanscanError as e:
            err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as e:  # unwritable --out, a folder where a file should be, a full disk
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            err_console.print(f"[red]error:[/red] {escape(f'{where}{e.strerror or e}')}", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as e:
            what, code = ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)
            err_console.print(f"{what}; finished work is saved, rerun the same command to resume")
            raise typer.Exit(code) from None
        finally:
            if main_thread:
                if previous is not None:  # None: a handler not installed from Python
                    signal.signal(signal.SIGTERM, previous)

    signature = inspect.signature(func)
    quiet = inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                              default=typer.Option(False, "--quiet", "-q", help=QUIET_HELP))
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), quiet])
    return wrapper  # type: ignore[return-value]


MEAN_HELP = "the model expects (x-mean)/std inputs: e.g. 0.1307 or 0.485,0.456,0.406"
STD_HELP = "… with this std, e.g. 0.3081 or 0.229,0.224,0.225"
TRUST_HELP = ("load a TorchScript model without checking its code (your own model only; results say "
              "'trusted, unchecked')")
OPTION_HELP = "a method option KEY=VALUE (repeatable); see the method's options in the error for a bad key"


def parse_floats(text: str | None, option: str) -> list[float] | None:
    """``"0.5"`` or ``"0.485,0.456,0.406"`` → floats; a clear error names the option."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise TrojanscanError(f"{option} {text!r}: expected numbers separated by commas") from None
    if not all(math.isfinite(v) for v in values):
        raise TrojanscanError(f"{option} {text!r}: expected finite numbers")
    return values


def _convention(mean: str | None, std: str | None, trusted: bool = False,
                device: str | None = None) -> dict[str, Any]:
    """How to open, feed and place the model (--mean/--std, --trust-model, --device), as keyword
    arguments of a workflow."""
    if trusted:
        err_console.print("[yellow]warning:[/yellow] --trust-model: the model file's code is not checked; "
                          "use it only for a model you made yourself", highlight=False)
    found = {"mean": parse_floats(mean, "--mean"), "std": parse_floats(std, "--std"), "trusted": trusted}
    return found if device is None else {**found, "device": device}


def _method_options(cls: type, pairs: list[str] | None, given: dict[str, Any], what: str) -> dict[str, Any]:
    """A method's options: the shortcut flags the user gave (``given``, None = not given) that the
    method has, then each ``--option KEY=VALUE``; a shortcut it lacks is a one-line error."""
    fields = option_fields(cls.options_type)
    options: dict[str, Any] = {}
    for key, value in given.items():
        if value is None:
            continue
        if key not in fields:
            raise TrojanscanError(f"--{key.replace('_', '-')} does not apply to {what} {cls.name}; its "
                                  f"options are: {', '.join(describe_options(cls.options_type))}")
        options[key] = value
    for key, value in parse_options(cls.options_type, pairs or [], what=f"{what} {cls.name}").items():
        if key in options and options[key] != value:
            raise TrojanscanError(f"--option {key}={value} contradicts --{key.replace('_', '-')} "
                                  f"{options[key]}; give it once")
        options[key] = value
    return options


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def _scores_table(title: str, scores: dict[str, Any]) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("clean accuracy (CA)", _fmt(scores.get("clean_accuracy")))
    table.add_row("attack success rate (ASR)", _fmt(scores.get("attack_success_rate")))
    return table


POISONING = attacks_of_kind(PoisoningAttack)
MODEL_ATTACKS = attacks_of_kind(ModelAttack)
# shortcut flags of `train` → the attack option each one sets (only for attacks that have it)
ATTACK_FLAGS = {"target": "target", "poison_rate": "poison_rate", "trigger_size": "size",
                "trigger_position": "position", "trigger_color": "color", "alpha": "alpha",
                "pixels": "pixels"}


@app.command()
@friendly_errors
def train(
    data: str = typer.Option(..., "--data", help="digits, mnist, gtsrb, an .npz or a dataset folder"),
    out: Path = typer.Option(..., "--out", help="model file: .safetensors or .pt (TorchScript)"),
    arch: str = typer.Option(None, "--arch", help=f"{', '.join(ARCHITECTURES)} (default: by data)"),
    epochs: int = typer.Option(5, "--epochs"),
    attack: str = typer.Option(None, "--attack", help=", ".join(POISONING) + " (default: a clean model)"),
    target: int = typer.Option(0, "--target", help="the attack's target label"),
    trigger_size: int = typer.Option(4, "--trigger-size", help="badnets patch side in pixels"),
    trigger_position: str = typer.Option("bottom-right", "--trigger-position",
                                         help="bottom-right, top-left, …, center or ROW,COL"),
    trigger_color: str = typer.Option("white", "--trigger-color",
                                      help="white, black, checker or random"),
    alpha: float = typer.Option(0.2, "--alpha", help="blend opacity"),
    pixels: int = typer.Option(16, "--pixels", help="scatter: number of trigger pixels"),
    poison_rate: float = typer.Option(0.1, "--poison-rate"),
    option: list[str] = typer.Option(None, "--option", help="an attack option KEY=VALUE (repeatable)"),
    batch_size: int = typer.Option(128, "--batch-size"),
    lr: float = typer.Option(1e-3, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    json_path: Path = typer.Option(None, "--json", help="write the result here"),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
) -> None:
    """Train a model on a dataset, optionally planting a backdoor by poisoning its training data."""
    options: dict[str, Any] = {}
    if attack is not None:
        if attack not in POISONING:
            kind = " (a model attack: run trojanscan attack)" if attack in MODEL_ATTACKS else ""
            raise TrojanscanError(f"unknown attack {attack!r}{kind}; choose one of {', '.join(POISONING)}")
        cls = POISONING[attack]
        flags = {"target": target, "poison_rate": poison_rate, "trigger_size": trigger_size,
                 "trigger_position": trigger_position, "trigger_color": trigger_color, "alpha": alpha,
                 "pixels": pixels}
        fields = option_fields(cls.options_type)
        options = {ATTACK_FLAGS[k]: v for k, v in flags.items() if ATTACK_FLAGS[k] in fields}
        options.update(parse_options(cls.options_type, option or [], what=f"attack {attack}"))
    elif option:
        raise TrojanscanError("--option needs --attack")
    record = train_and_save(data, out, arch=arch, epochs=epochs, attack=attack,
                            attack_options=options, batch_size=batch_size, lr=lr, seed=seed,
                            json_path=json_path, quiet=_quiet, device=device)
    console.print(_scores_table(f"{out}", record.to_dict()))
    console.print(f"→ {out}" + (f", trigger {record.trigger['file']}" if record.trigger else "")
                  + (f", {json_path}" if json_path else ""), highlight=False)


@app.command("attack")
@friendly_errors
def attack_cmd(
    name: str = typer.Argument(..., help="the model attack: " + ", ".join(MODEL_ATTACKS)),
    model: Path = typer.Option(..., "--model", help="the trained model to attack"),
    data: str = typer.Option(..., "--data", help="the attacker's data (its training split is used)"),
    out: Path = typer.Option(..., "--out", help="the attacked model (.safetensors or .pt)"),
    target: int = typer.Option(None, "--target", help="the target label"),
    wb: int = typer.Option(None, "--wb", help="tbt: the last-layer weights it may change"),
    option: list[str] = typer.Option(None, "--option", help=OPTION_HELP),
    mean: str = typer.Option(None, "--mean", help=MEAN_HELP),
    std: str = typer.Option(None, "--std", help=STD_HELP),
    trust_model: bool = typer.Option(False, "--trust-model", help=TRUST_HELP),
    arch: str = typer.Option(None, "--arch", help=ARCH_HELP),
    json_path: Path = typer.Option(None, "--json", help="write the result here"),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
) -> None:
    """Attack a trained model (a model attack); the trigger is saved beside the attacked model."""
    if name not in MODEL_ATTACKS:
        kind = " (a poisoning attack: use trojanscan train --attack)" if name in POISONING else ""
        raise TrojanscanError(f"unknown model attack {name!r}{kind}; choose one of "
                              f"{', '.join(MODEL_ATTACKS)}")
    options = _method_options(MODEL_ATTACKS[name], option, {"target": target, "wb": wb}, "attack")
    record = attack_model(name, model, data, out, options=options, arch=arch, json_path=json_path,
                          **_convention(mean, std, trust_model, device))
    table = Table(title=f"{name} on {model}")
    for col in ("model", "clean accuracy", "ASR"):
        table.add_column(col, justify="right")
    for row, scores in (("before", record.before), ("after", record.after)):
        table.add_row(row, _fmt(scores["clean_accuracy"]), _fmt(scores["attack_success_rate"]))
    console.print(table)
    if "bit_flips" in record.report:
        console.print(f"{record.report['bit_flips']} bit flips in {record.report['weights_changed']} of "
                      f"{record.report['weights_total']:,} weights (8-bit, two's complement)")
    console.print(f"{record.seconds:.1f} s → {out}; trigger saved to {record.trigger['file']}")


@app.command("evaluate")
@friendly_errors
def evaluate_cmd(
    model: Path = typer.Argument(..., help="model file"),
    data: str = typer.Option(..., "--data"),
    trigger: Path = typer.Option(None, "--trigger",
                                 help="trigger .npz (default: the model's own, if saved beside it)"),
    mean: str = typer.Option(None, "--mean", help=MEAN_HELP),
    std: str = typer.Option(None, "--std", help=STD_HELP),
    trust_model: bool = typer.Option(False, "--trust-model", help=TRUST_HELP),
    arch: str = typer.Option(None, "--arch", help=ARCH_HELP),
    json_path: Path = typer.Option(None, "--json"),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
) -> None:
    """Clean accuracy and, with a trigger, attack success rate of a model on a dataset."""
    record = evaluate_file(model, data, trigger, arch=arch, **_convention(mean, std, trust_model, device))
    if record.trigger_found_beside_model:
        say(f"using the trigger saved beside the model: {record.trigger['file']}")
    if json_path is not None:
        record.write(json_path)
    console.print(_scores_table(f"{model} on {record.data['name']}", record.to_dict()))
    for w in record.get("warnings") or []:  # data unlike the model's own, accuracy near chance
        warn(w)
    if json_path is not None:
        console.print(f"→ {json_path}", highlight=False)


@app.command()
@friendly_errors
def demo(
    out: Path = typer.Option(Path("trojanscan-demo"), "--out", help="folder for the demo's files"),
    epochs: int = typer.Option(30, "--epochs"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
) -> None:
    """Plant a BadNets backdoor in a digits classifier, find it with Neural Cleanse, then repair it."""
    with folder_lock(out, "demo folder"):
        say("[bold]trojanscan demo[/bold]: training a BadNets-trojaned model on scikit-learn's "
            "digits (3×3 white patch, target 0, 10% poisoned)…")
        options = {"target": 0, "poison_rate": 0.1, "size": 3, "position": "bottom-right",
                   "color": "white"}
        record = train_and_save("digits", out / "model.safetensors", arch="mnist-cnn", epochs=epochs,
                                attack="badnets", attack_options=options, batch_size=64, lr=1e-3,
                                seed=seed, json_path=out / "train.json", quiet=_quiet, device=device)
        console.print(_scores_table("trojaned digits model", record.to_dict()))
        say(f"({record.train_seconds:.1f} s of training) — now scanning it with Neural "
            "Cleanse, knowing nothing of the trigger…")
        result = scan(out / "model.safetensors", "digits", clean_samples=300, seed=seed,
                      out_dir=out / "scan", device=device)
        print_scan_summary(result, out / "scan")
        if not result.infected:
            console.print("nothing flagged, so nothing to repair")
            _print_files(out, DEMO_FILES)
            return
        say("repairing it by unlearning the reversed trigger (the real one is only measured)…")
        fixed = repair(out / "model.safetensors", out / "scan", "digits", method="unlearn", fraction=0.5,
                       epochs=3, seed=seed, out=out / "repaired.safetensors", device=device)
        fixed.write(out / "repair.json")
        console.print(_rates_table("unlearning", fixed.to_dict()))
        for w in repair_warnings(fixed.to_dict(), 2.0):
            warn(w)
        _print_files(out, DEMO_FILES)


DEMO_FILES = {
    "model.safetensors": "the trojaned model (weights only, no code)",
    "model.trigger.npz": "the trigger the attacker planted (mask, pattern, target)",
    "train.json": "its training record: clean accuracy and attack success rate",
    "scan/report.html": "the scan's report: verdict, every label's reversed trigger, the repair",
    "scan/scan.json": "the scan's result, machine-readable",
    "repaired.safetensors": "the model after unlearning",
    "repair.json": "the repair's record: accuracy and attack success before and after",
}


def _print_files(out: Path, files: dict[str, str]) -> None:
    """Every file a command wrote under ``out`` that exists, with what it holds."""
    console.print(f"files in {out}:", highlight=False)
    for name, what in files.items():
        if (out / name).is_file():
            console.print(f"  {out / name} — {what}", highlight=False)


def _labels(text: str | None, option: str = "--labels") -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TrojanscanError(f"{option} {text!r}: expected label numbers like 0,3,7") from None




def _weights(text: str | None) -> list[str] | None:
    """``--tabor-weights "mask_size=1e-5,alone=0.1"`` as the method's ``weights.NAME=VALUE`` options."""
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def print_size_ratio(ratio: float) -> None:
    """The second opinion beside the MAD verdict: how small the smallest trigger is."""
    if ratio == ratio:  # not NaN
        console.print(f"smallest reversed trigger / the median label's L1: {size_ratio_text(ratio)}",
                      highlight=False)


BANNER_COLOURS = {"bad": "bold red", "good": "bold green", "none": "bold"}


def print_banner(kind: str, headline: str, strength: str, flagged: list[int]) -> None:
    """The verdict's headline (``report.html.verdict_banner``), coloured by what it says, and how
    strong its evidence is."""
    if kind == "bad":
        headline = f"BACKDOOR DETECTED — target label(s) {', '.join(map(str, flagged))}"
    colour = BANNER_COLOURS[kind]
    console.print(f"[{colour}]{headline}[/{colour}]" + (f"; {strength}" if strength else ""), highlight=False)


def print_verdict(verdict: dict[str, Any]) -> None:
    """The combined verdict and every piece of evidence behind it."""
    colour = {"backdoored": "bold red", "suspicious": "bold yellow",
              "clean": "bold green"}[verdict["verdict"]]
    what = (f" — target label(s) {', '.join(map(str, verdict['targets']))}" if verdict["targets"] else "")
    kind = f" ({verdict['kind']})" if verdict.get("kind") else ""
    pattern = ("; the all-to-all pattern decides, whatever the score"
               if verdict.get("kind") == "all-to-all" and verdict["verdict"] == "backdoored" else "")
    console.print(f"[{colour}]{verdict['verdict'].upper()}[/{colour}]{what}{kind}; "
                  + score_phrase(verdict) + pattern)
    for e in verdict["evidence"]:
        p = e.get("p_value")
        console.print(f"  {e['name']} alone: {e['says']} — value {e['value']:.3g} "
                      f"(threshold {e['threshold']:.3g})"
                      + (f", p {p:.3g}" if p is not None and p == p else "")
                      + (f"; {e['detail']}" if e.get("detail") else ""), highlight=False)


def print_scan_summary(result: ScanResult, out: Path | None) -> None:
    """The verdict first, then the most anomalous labels."""
    if "verdict" in result.extra:
        print_verdict(result.extra["verdict"])
        paper = result.extra.get("paper", {})
        console.print(f"paper's MAD test: flagged {paper.get('flagged_labels') or 'none'}, anomaly index "
                      f"{result.anomaly_index:.2f} (threshold {result.threshold:g})")
    else:  # the verdict holds the size ratio to its own threshold: the rule of thumb only without it
        print_banner(*verdict_banner(result), result.flagged_labels)
        print_size_ratio(result.size_ratio)
    table = Table(title=f"smallest reversed triggers ({result.method})")
    for col in ("label", "L1 norm", "anomaly index", "ASR", "steps", "seconds"):
        table.add_column(col, justify="right")
    for r in sorted(result.labels, key=lambda r: r.l1_norm)[:5]:
        table.add_row(str(r.label), f"{r.l1_norm:.1f}", f"{r.anomaly_index:.2f}",
                      f"{100 * r.attack_success_rate:.1f}%", str(r.steps), f"{r.seconds:.1f}")
    console.print(table)
    cls = REVERSERS.get(result.method)
    summary = result.extra.get(cls.outlier_summary) if cls and cls.outlier_summary else None
    if summary and "anomaly_index" in summary:
        console.print(f"{cls.title} {cls.outlier_summary} outliers: {summary['flagged_labels'] or 'none'}, "
                      f"anomaly index {summary['anomaly_index']:.2f}")
    truth = result.extra.get("ground_truth")
    if truth and "overlap" in truth:
        console.print(f"real trigger: target {truth['target']}, area {truth['area']:.0f}; reversed L1 "
                      f"{truth['reversed_l1']:.1f}, IoU {truth['overlap']['iou']:.2f}")
    for w in result.warnings:
        warn(w)
    precision = result.parameters.get("precision", "float32")
    console.print(f"{result.seconds:.1f} s, {result.image_passes:,} image passes"
                  + (f" in {precision}" if precision != "float32" else "")
                  + (f" → {out / 'scan.json'}, {out / 'report.html'}" if out else ""), highlight=False)


@app.command("scan")
@friendly_errors
def scan_cmd(
    model: Path = typer.Argument(..., help="model file (TorchScript, safetensors, checkpoint)"),
    data: str = typer.Option(..., "--data", help="clean data: digits, mnist, gtsrb, a file or folder"),
    out: Path = typer.Option(..., "--out", help="folder for scan.json, triggers and report.html"),
    method: str = typer.Option("neural-cleanse", "--method", help=", ".join(REVERSERS)),
    option: list[str] = typer.Option(None, "--option", help=OPTION_HELP),
    decision: str = typer.Option("paper", "--decision", help="paper (Neural Cleanse's MAD > threshold) "
                                 "or verdict (also MM-BD and the untargeted trigger: one decision with "
                                 "its evidence; provisional thresholds) or verdict-pairs (verdict and the "
                                 "label-pair search for source-specific backdoors, about twice the time)"),
    labels: str = typer.Option(None, "--labels", help="only these labels, e.g. 0,3,7"),
    chunk: int = typer.Option(None, "--chunk", help="labels optimised together in one pass (10)"),
    steps: int = typer.Option(None, "--steps", help="maximum steps per label"),
    clean_samples: int = typer.Option(1000, "--clean-samples"),
    mean: str = typer.Option(None, "--mean", help=MEAN_HELP),
    std: str = typer.Option(None, "--std", help=STD_HELP),
    trust_model: bool = typer.Option(False, "--trust-model", help=TRUST_HELP),
    schedule: str = typer.Option(None, "--schedule", help="default (fast) or paper (the authors')"),
    tabor_weights: str = typer.Option(None, "--tabor-weights", help="shorthand for --option "
                                      "weights.NAME=VALUE, e.g. mask_size=1e-5,alone=0.1"),
    threshold: float = typer.Option(None, "--threshold", help="anomaly index above which a label is "
                                    "flagged (2)"),
    seed: int = typer.Option(None, "--seed", help="seed of the clean subset and the search (0)"),
    repeats: int = typer.Option(1, "--repeats", help="scan with seeds SEED, SEED+1, … and "
                                "flag outliers of the averaged trigger norms (each run in OUT/seed-N)"),
    arch: str = typer.Option(None, "--arch", help=ARCH_HELP),
    trigger: Path = typer.Option(None, "--trigger", help="the real trigger, to compare (default: "
                                 "the one saved beside the model)"),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
) -> None:
    """Detect a backdoor: reverse-engineer a trigger per label (Neural Cleanse, TABOR), flag outliers."""
    cls = reverser(method)
    options = _method_options(cls, option, {"schedule": schedule, "steps": steps, "chunk": chunk,
                                            "threshold": threshold, "seed": seed}, "method")
    seed = options.pop("seed", 0)
    common = dict(method=method, decision=decision, labels=_labels(labels), clean_samples=clean_samples,
                  arch=arch, precision=precision,
                  ground_truth=trigger, out_dir=out, tabor_weights=_weights(tabor_weights),
                  **_convention(mean, std, trust_model, device), **options)
    if repeats == 1:
        print_scan_summary(scan(model, data, seed=seed, **common), out)
        return
    combined = scan_repeated(model, data, repeats=repeats, seed=seed, **common)
    for run in combined.runs:
        console.print(f"seed {run.seed}: anomaly index {run.anomaly_index:.2f}, flagged "
                      f"{run.flagged_labels or 'none'} ({run.seconds:.1f} s)")
    spread = combined.spread()
    print_size_ratio(combined.size_ratio)
    for w in sorted({w for run in combined.runs for w in run.warnings}):
        warn(w)
    tested = combined.anomaly_index == combined.anomaly_index  # NaN: too few labels for the test
    kind = "bad" if combined.infected else "good" if tested else "none"
    headline = {"good": "No backdoor found", "none": "No verdict — fewer than 3 labels, so no outlier test",
                "bad": ""}[kind]
    print_banner(kind, headline, evidence_strength(combined.anomaly_index, combined.threshold,
                                                   combined.infected) if tested else "",
                 combined.flagged_labels)
    console.print(f"the anomaly index is of the mean trigger norms over {repeats} seeds; the runs' spread "
                  f"{spread['min']:.2f}–{spread['max']:.2f} (std {spread['std']:.2f}) → "
                  f"{out / 'repeats.json'}, {out / 'report.html'}", highlight=False)


RUNNER_HELP = 'local (this machine: one process, or --workers processes) or ray (pip install -e ".[ray]")'
WORKERS_HELP = "processes (or Ray tasks) at a time; each gets its share of the cores"
ADDRESS_HELP = "--runner ray: join the Ray cluster at this address (default: start one on this machine)"
VERDICT_COLOURS = {"backdoored": "bold red", "suspicious": "bold yellow", "clean": "green"}


def _population_text(population: dict[str, Any] | None) -> str:
    """The audit table's population cell: what it says, its score and label."""
    if not population:
        return "—"
    return f"{population['says']} p {population['score']:.2g} ({labels_text(population)})"


@app.command("audit")
@friendly_errors
def audit_cmd(
    models: list[Path] = typer.Argument(..., help="model files, folders of them, or a manifest (.csv or "
                                        ".json: path, and optionally name, data, mean, std, arch, trigger)"),
    data: str = typer.Option(None, "--data", help="clean data for every model (a manifest may give "
                             "each model its own): digits, mnist, gtsrb, a file or folder"),
    out: Path = typer.Option(..., "--out", help="folder for audit.json, audit.html and one scan folder "
                             "per model"),
    methods: str = typer.Option("neural-cleanse", "--methods",
                                help="comma-separated: " + ", ".join(REVERSERS)),
    option: list[str] = typer.Option(None, "--option", help=OPTION_HELP + " (for every method)"),
    decision: str = typer.Option("paper", "--decision", help="paper or verdict (as scan's --decision)"),
    chunk: int = typer.Option(None, "--chunk", help="labels optimised together in one pass (10)"),
    steps: int = typer.Option(None, "--steps", help="maximum steps per label"),
    schedule: str = typer.Option(None, "--schedule", help="default (fast) or paper (the authors')"),
    threshold: float = typer.Option(None, "--threshold", help="anomaly index above which a label is "
                                    "flagged (2)"),
    seed: int = typer.Option(None, "--seed", help="seed of the clean subset and the search (0)"),
    clean_samples: int = typer.Option(1000, "--clean-samples"),
    mean: str = typer.Option(None, "--mean", help=MEAN_HELP),
    std: str = typer.Option(None, "--std", help=STD_HELP),
    arch: str = typer.Option(None, "--arch", help=ARCH_HELP),
    trust_model: bool = typer.Option(False, "--trust-model", help=TRUST_HELP),
    runner: str = typer.Option("local", "--runner", help=RUNNER_HELP),
    workers: int = typer.Option(None, "--workers", help="processes (or Ray tasks) at a time, each scan on "
                                "one thread so that every runner gives the same results [default: one "
                                "per core]"),
    address: str = typer.Option(None, "--address", help=ADDRESS_HELP),
    split_over: int = typer.Option(20, "--split-over", help="with several workers, split a model with "
                                   "more labels than this into label jobs"),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
) -> None:
    """Scan many models: files, folders or a manifest; a summary table, audit.json and audit.html
    (rerun the same command to resume; a model that fails is recorded and the audit goes on)."""
    names = [m.strip() for m in methods.split(",") if m.strip()]
    given = {"schedule": schedule, "steps": steps, "chunk": chunk, "threshold": threshold, "seed": seed}
    per_method = [_method_options(reverser(m), option, given, "method") for m in names]  # each checks them

    def progress(entry: dict[str, Any]) -> None:
        what = entry["verdict"] if entry["status"] == "ok" else f"error: {entry['error']}"
        say(f"{escape(entry['name'])}: {escape(what)} ({entry['seconds']:.1f} s)", highlight=False)

    result = audit(models, data, out_dir=out, methods=names, decision=decision,
                   options=per_method[0] if per_method else {},
                   clean_samples=clean_samples, arch=arch, runner=runner, workers=workers, address=address,
                   split_over=split_over, device=device, precision=precision, on_model_done=progress,
                   **_convention(mean, std, trust_model))
    table = Table(title=f"audit of {len(result.models)} models")
    for col in ("model", "verdict", "flagged", "anomaly index", "population", "seconds"):
        table.add_column(col, justify="left" if col in ("model", "verdict") else "right")
    for m in result.models:
        verdict = m.get("verdict") or "error"
        colour = VERDICT_COLOURS.get(verdict, "red" if m["status"] == "error" else "")
        index = m.get("anomaly_index")
        table.add_row(escape(m["name"]), f"[{colour}]{verdict}[/{colour}]" if colour else verdict,
                      ", ".join(map(str, m.get("flagged_labels") or [])) or "—",
                      "—" if not isinstance(index, float) or index != index else f"{index:.2f}",
                      _population_text(m.get("population")),
                      f"{m['seconds']:.1f}" + (" (earlier)" if m.get("skipped") else ""))
    console.print(table)
    console.print(f"→ {out / 'audit.json'}, {out / 'audit.html'}", highlight=False)
    if result.failed:
        err_console.print(f"[red]error:[/red] {len(result.failed)} model(s) failed: "
                          + escape("; ".join(f"{m['name']} ({m['error']})" for m in result.failed)),
                          highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _rates_table(title: str, record: dict[str, Any]) -> Table:
    """Before/after CA and ASR of a repair (and its baselines)."""
    table = Table(title=title)
    for col in ("model", "clean accuracy", "ASR reversed trigger", "ASR real trigger"):
        table.add_column(col, justify="right")
    rows = [("before", record["before"]), ("after", record["after"])]
    rows += [(f"baseline: {k}", v) for k, v in (record.get("baselines") or {}).items()]
    for name, r in rows:
        table.add_row(name, _fmt(r["clean_accuracy"]), _fmt(r["reversed_asr"]), _fmt(r["real_asr"]))
    return table


@app.command("filter")
@friendly_errors
def filter_cmd(
    model: Path = typer.Argument(..., help="model file (safetensors or checkpoint)"),
    scan_path: Path = typer.Option(..., "--scan", help="the scan folder or its scan.json"),
    data: str = typer.Option(..., "--data", help="clean data (held-out training images fit the filter)"),
    out: Path = typer.Option(..., "--out", help="filter file (.npz)"),
    fpr: float = typer.Option(0.05, "--fpr", help="false positive rate on clean inputs"),
    top: float = typer.Option(0.01, "--top", help="share of the layer's neurons to watch"),
    layer: str = typer.Option(None, "--layer", help="a module name (default: second-to-last layer)"),
    labels: str = typer.Option(None, "--label", help="use these labels' triggers, not the flagged ones"),
    samples: int = typer.Option(2000, "--samples", help="clean images to fit on"),
    trigger: Path = typer.Option(None, "--trigger", help="the real trigger, to measure (default: beside "
                                 "the model)"),
    seed: int = typer.Option(0, "--seed"),
    mean: str = typer.Option(None, "--mean", help=MEAN_HELP),
    std: str = typer.Option(None, "--std", help=STD_HELP),
    trust_model: bool = typer.Option(False, "--trust-model", help=TRUST_HELP),
    arch: str = typer.Option(None, "--arch", help=ARCH_HELP),
    json_path: Path = typer.Option(None, "--json"),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
) -> None:
    """Build Neural Cleanse's input filter from a scan's reversed trigger; report FPR and FNR."""
    _, record = build_filter(model, scan_path, data, labels=_labels(labels, "--label"), layer=layer,
                             fpr=fpr,
                             top_fraction=top, samples=samples, trigger=trigger, seed=seed, arch=arch,
                             out=out, **_convention(mean, std, trust_model, device))
    if json_path is not None:
        record.write(json_path)
    f = record["filter"]
    console.print(f"filter on {len(f['neurons'])} of {f['units']} neurons ({record['layer']}) → {out}")
    console.print(f"clean test images rejected (FPR): {_fmt(f['fpr'])}; stamped images let through "
                  f"(FNR): reversed trigger {_fmt(f['fnr_reversed'])}, real trigger {_fmt(f['fnr_real'])}")
    _print_published(scan_path, json_path)


INPUTS_HELP = (".npz (array x, or --key), .npy, an image, a folder of images, or a dataset (its test "
               "split); arrays N×H×W, N×H×W×C or N×C×H×W, uint8 0–255 or float 0–1")
KEY_HELP = "the .npz array holding the images (default: x, or its only array)"
LAYOUT_HELP = "nhwc or nchw: the arrays' layout, where the shape leaves it open"
RANGE_HELP = "255 for float arrays holding 0–255 pixels (default: floats are 0–1)"


def _read_inputs(inputs: str, key: str | None, layout: str | None, value_range: int | None) -> RunInputs:
    """Read --inputs and say in one line what was read and how (layout and range)."""
    found = read_inputs(inputs, key=key, layout=layout, value_range=value_range)
    say(f"inputs: {found.describe()}", highlight=False, markup=False)
    return found


def _print_published(scan_path: Path, *also: Path | None) -> None:
    """Where a mitigation's results went: the scan folder's report gains its section."""
    folder = scan_path.parent if scan_path.suffix == ".json" else scan_path
    paths = [p for p in also if p is not None] + [folder / "mitigation.json", folder / "report.html"]
    console.print("→ " + ", ".join(map(str, paths)) + " (with the mitigation section)", highlight=False)


def repair_warnings(record: dict[str, Any], budget_points: float) -> list[str]:
    """What a repair's numbers say that its table does not: pruning stopped by the accuracy budget,
    a clean accuracy cost over the budget, an attack that still works."""
    out = []
    p = record.get("pruning")
    fp = record.get("fine_pruning")
    if fp and fp.get("over_budget"):
        cost = 100 * (fp["curve"][0]["clean_accuracy"] - fp["over_budget"]["clean_accuracy"])
        out.append(f"fine-pruning stopped at {fp['fraction']:.1%} of the channels: one more step would cost "
                   f"{cost:.1f} points of clean accuracy before fine-tuning (budget {budget_points:g} "
                   "points, --max-accuracy-drop; the paper allows 4)")
    if p and p.get("over_budget"):
        nxt = p["over_budget"]
        cost = 100 * (p["curve"][0]["clean_accuracy"] - nxt["clean_accuracy"])
        out.append(f"pruning stopped at {p['fraction']:.1%} of the neurons: one more step would cost "
                   f"{cost:.1f} points of clean accuracy in all (budget {budget_points:g} points, "
                   "--max-accuracy-drop); raise the budget or repair by unlearning")
    elif p and not p.get("reached"):
        out.append(f"the reversed trigger's ASR did not fall below {p['asr_threshold']:.1%} within "
                   "the pruning limit")
    before, after = record.get("before") or {}, record.get("after") or {}
    if p and before.get("clean_accuracy") is not None and after.get("clean_accuracy") is not None:
        drop = 100 * (before["clean_accuracy"] - after["clean_accuracy"])
        if drop > budget_points:
            out.append(f"the repair cost {drop:.1f} points of clean accuracy on the test split "
                       f"(budget {budget_points:g}); the paper's pruning cost under 1 point for BadNets")
    for key, what in (("real_asr", "the real trigger"), ("reversed_asr", "the reversed trigger")):
        if after.get(key) is not None and after[key] >= 0.01:
            out.append(f"{what} still works on {after[key]:.1%} of the test images after the repair")
            break
    return out


@app.command("filter-check")
@friendly_errors
def filter_check_cmd(
    model: Path = typer.Argument(..., help="model file"),
    filter_path: Path = typer.Option(..., "--filter", help="file from trojanscan filter"),
    inputs: str = typer.Option(..., "--inputs", help=INPUTS_HELP),
    key: str = typer.Option(None, "--key", help=KEY_HELP),
    layout: str = typer.Option(None, "--layout", help=LAYOUT_HELP),
    value_range: int = typer.Option(None, "--range", help=RANGE_HELP),
    json_path: Path = typer.Option(None, "--json"),
    mean: str = typer.Option(None, "--mean", help=MEAN_HELP),
    std: str = typer.Option(None, "--std", help=STD_HELP),
    trust_model: bool = typer.Option(False, "--trust-model", help=TRUST_HELP),
    arch: str = typer.Option(None, "--arch", help=ARCH_HELP),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
) -> None:
    """Predict each input and reject those the input filter flags."""
    found = _read_inputs(inputs, key, layout, value_range)
    record = filter_check(model, filter_path, found, arch=arch, **_convention(mean, std, trust_model, device))
    if json_path is not None:
        record.write(json_path)
    console.print(f"{record['rejected']} of {record['count']} inputs rejected by the filter"
                  + (f" → {json_path}" if json_path else ""), highlight=False)


@app.command("repair")
@friendly_errors
def repair_cmd(
    model: Path = typer.Argument(..., help="model file (safetensors, TorchScript or checkpoint)"),
    scan_path: Path = typer.Option(None, "--scan", help="the scan folder or its scan.json (optional for "
                                   "fine-prune, which needs no trigger; with it the reversed trigger is "
                                   "measured and the scan report gains the result)"),
    data: str = typer.Option(..., "--data", help="clean data (training split fine-tunes or ranks)"),
    method: str = typer.Option("unlearn", "--method", help="unlearn, prune or fine-prune (Fine-Pruning: "
                               "remove the channels clean data leaves dormant, then fine-tune)"),
    out: Path = typer.Option(..., "--out", help="repaired model (.safetensors or .pt)"),
    json_path: Path = typer.Option(None, "--json", help="result JSON (CA/ASR before and after)"),
    labels: str = typer.Option(None, "--label", help="use these labels' triggers, not the flagged ones"),
    trigger: Path = typer.Option(None, "--trigger", help="the real trigger, to measure (default: beside "
                                 "the model)"),
    layer: str = typer.Option(None, "--layer", help="prune, fine-prune: a Linear/Conv2d module name "
                              "(fine-prune default: the last convolution)"),
    asr_threshold: float = typer.Option(0.01, "--asr-threshold", help="prune: stop below this ASR"),
    step: float = typer.Option(0.01, "--step", help="prune, fine-prune: share of neurons removed per step"),
    samples: int = typer.Option(2000, "--samples", help="prune, fine-prune: clean images to rank and "
                                "measure"),
    max_accuracy_drop: float = typer.Option(2.0, "--max-accuracy-drop",
                                            help="prune, fine-prune: stop before a step that costs more "
                                                 "clean accuracy than this, in points"),
    fraction: float = typer.Option(0.1, "--fraction", help="unlearn, fine-prune: share of the training "
                                   "data fine-tuned on"),
    stamp_fraction: float = typer.Option(0.2, "--stamp-fraction", help="unlearn: share stamped"),
    epochs: int = typer.Option(1, "--epochs", help="unlearn, fine-prune: fine-tuning epochs"),
    lr: float = typer.Option(None, "--lr", help="unlearn, fine-prune: Adam learning rate (default: "
                             "2e-3 one-cycle, peak 2×, for unlearn; 2e-4 constant for fine-prune)"),
    baselines: bool = typer.Option(False, "--baselines", help="unlearn: also fine-tune on clean "
                                   "images only and with the real trigger, for comparison"),
    seed: int = typer.Option(0, "--seed"),
    mean: str = typer.Option(None, "--mean", help=MEAN_HELP),
    std: str = typer.Option(None, "--std", help=STD_HELP),
    trust_model: bool = typer.Option(False, "--trust-model", help=TRUST_HELP),
    arch: str = typer.Option(None, "--arch", help=ARCH_HELP),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
) -> None:
    """Remove the backdoor a scan found: unlearning (fine-tune) or neuron pruning; or Fine-Pruning,
    which needs no scan."""
    record = repair(model, scan_path, data, method=method, out=out, labels=_labels(labels, "--label"),
                    trigger=trigger, layer=layer, samples=samples, asr_threshold=asr_threshold,
                    step=step, max_accuracy_drop=max_accuracy_drop / 100, fraction=fraction,
                    stamp_fraction=stamp_fraction, epochs=epochs, lr=lr,
                    baselines=baselines, seed=seed, arch=arch, **_convention(mean, std, trust_model, device))
    if json_path is not None:
        record.write(json_path)
    console.print(_rates_table(f"{method} of {model}", record.to_dict()))
    if "pruning" in record:
        p = record["pruning"]
        console.print(f"pruned {p['pruned']} of {p['units']} neurons ({p['fraction']:.1%}) of "
                      f"{record['layer']}", highlight=False)
    if "fine_pruning" in record:
        fp = record["fine_pruning"]
        console.print(f"pruned {fp['pruned']} of {fp['units']} dormant channels ({fp['fraction']:.1%}) of "
                      f"{record['layer']}, then fine-tuned on {fp['images']} clean images; after pruning "
                      f"alone: CA {_fmt(fp['pruned_only']['clean_accuracy'])}, real-trigger ASR "
                      f"{_fmt(fp['pruned_only']['real_asr'])}", highlight=False)
    for w in repair_warnings(record.to_dict(), max_accuracy_drop):
        warn(w)
    console.print(f"{record['seconds']:.1f} s → {out}" + (f", {json_path}" if json_path and not scan_path
                                                           else ""), highlight=False)
    if scan_path is not None:
        _print_published(scan_path, json_path)


TEMPERATURE_HELP = ("softmax temperature (1 = the paper), or auto: the one that makes benign entropies "
                    "most symmetric")
EAGER_HELP = "run the model as it is, without the frozen oneDNN copy (slower; for comparison)"
strip_app = typer.Typer(no_args_is_help=True,
                        help="STRIP: flag trojaned inputs at run time by the entropy of superimposed copies.")
app.add_typer(strip_app, name="strip")


@strip_app.command("calibrate")
@friendly_errors
def strip_calibrate_cmd(
    model: Path = typer.Argument(..., help="model file"),
    data: str = typer.Option(..., "--data", help="benign data (its training split is used)"),
    out: Path = typer.Option(..., "--out", help="calibration file (.npz)"),
    frr: float = typer.Option(0.01, "--frr", help="target false-rejection rate of benign inputs"),
    n: int = typer.Option(100, "--n", help="perturbed copies per input"),
    samples: int = typer.Option(2000, "--samples", help="benign calibration images"),
    blend: str = typer.Option("add", "--blend", help="add (the authors') or alpha"),
    boundary: str = typer.Option("normal", "--boundary", help="normal (the authors') or quantile"),
    temperature: str = typer.Option("1", "--temperature", help=TEMPERATURE_HELP),
    seed: int = typer.Option(0, "--seed"),
    mean: str = typer.Option(None, "--mean", help=MEAN_HELP),
    std: str = typer.Option(None, "--std", help=STD_HELP),
    trust_model: bool = typer.Option(False, "--trust-model", help=TRUST_HELP),
    arch: str = typer.Option(None, "--arch", help=ARCH_HELP),
    eager: bool = typer.Option(False, "--eager", help=EAGER_HELP),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
) -> None:
    """Fit the entropy boundary on benign inputs for a target FRR."""
    with warnings.catch_warnings():  # a useless boundary is reported below, in one line
        warnings.simplefilter("ignore", UserWarning)
        strip = strip_calibrate(model, data, n=n, frr=frr, samples=samples, blend=blend,
                                boundary=boundary, seed=seed, arch=arch, temperature=temperature,
                                out=out, accelerate=not eager, **_convention(mean, std, trust_model, device))
    console.print(f"calibrated on {strip.n_calibration_} benign images: entropy "
                  f"{strip.entropy_mean_:.3f} ± {strip.entropy_std_:.3f} bits, boundary "
                  f"{strip.boundary_:.4f} (FRR {frr:.1%}, N={n}, temperature {strip.temperature_:g}) → {out}")
    if strip.boundary_ <= 0:
        warn(strip.degenerate_message())


@strip_app.command("check")
@friendly_errors
def strip_check_cmd(
    model: Path = typer.Argument(..., help="model file"),
    calibration: Path = typer.Option(..., "--calibration", help="file from strip calibrate"),
    inputs: str = typer.Option(..., "--inputs", help=INPUTS_HELP),
    key: str = typer.Option(None, "--key", help=KEY_HELP),
    layout: str = typer.Option(None, "--layout", help=LAYOUT_HELP),
    value_range: int = typer.Option(None, "--range", help=RANGE_HELP),
    json_path: Path = typer.Option(None, "--json"),
    full_entropy: bool = typer.Option(False, "--full-entropy",
                                      help="run all N copies of every input (default: stop each "
                                           "input once its verdict is certain)"),
    mean: str = typer.Option(None, "--mean", help=MEAN_HELP),
    std: str = typer.Option(None, "--std", help=STD_HELP),
    trust_model: bool = typer.Option(False, "--trust-model", help=TRUST_HELP),
    arch: str = typer.Option(None, "--arch", help=ARCH_HELP),
    eager: bool = typer.Option(False, "--eager", help=EAGER_HELP),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
) -> None:
    """Predict each input and flag the trojaned ones."""
    found = _read_inputs(inputs, key, layout, value_range)
    record = strip_check(model, calibration, found, arch=arch, full_entropy=full_entropy,
                         accelerate=not eager, **_convention(mean, std, trust_model, device))
    if json_path is not None:
        record.write(json_path)
    console.print(f"{record['trojaned']} of {record['count']} inputs flagged as trojaned "
                  f"({record['inputs_per_second']:.0f} inputs/s, N={record['n']}, "
                  f"{record['mean_copies']:.1f} copies per input on average)"
                  + (f" → {json_path}" if json_path else ""), highlight=False)


@strip_app.command("evaluate")
@friendly_errors
def strip_evaluate_cmd(
    model: Path = typer.Argument(..., help="model file"),
    data: str = typer.Option(..., "--data"),
    trigger: Path = typer.Option(None, "--trigger", help="trigger file (default: beside the model)"),
    frr: float = typer.Option(0.01, "--frr"),
    n: int = typer.Option(100, "--n"),
    samples: int = typer.Option(2000, "--samples", help="benign and trojaned test inputs each"),
    blend: str = typer.Option("add", "--blend"),
    boundary: str = typer.Option("normal", "--boundary"),
    temperature: str = typer.Option("1", "--temperature", help=TEMPERATURE_HELP),
    seed: int = typer.Option(0, "--seed"),
    mean: str = typer.Option(None, "--mean", help=MEAN_HELP),
    std: str = typer.Option(None, "--std", help=STD_HELP),
    trust_model: bool = typer.Option(False, "--trust-model", help=TRUST_HELP),
    arch: str = typer.Option(None, "--arch", help=ARCH_HELP),
    out: Path = typer.Option(None, "--out", help="folder for strip.json and report.html"),
    json_path: Path = typer.Option(None, "--json"),
    eager: bool = typer.Option(False, "--eager", help=EAGER_HELP),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
) -> None:
    """FRR on clean and FAR on trigger-stamped test images, and throughput for N=10, 20 and 100."""
    record = strip_evaluate(model, data, trigger, n=n, frr=frr, samples=samples, blend=blend,
                            boundary=boundary, seed=seed, arch=arch, temperature=temperature,
                            out_dir=out, accelerate=not eager, **_convention(mean, std, trust_model, device))
    if json_path is not None:
        record.write(json_path)
    table = Table(title=f"STRIP on {model} (N={n})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for k, v in record.summary.items():
        table.add_row(k, v)
    console.print(table)
    written = ([out / "strip.json", out / "report.html"] if out is not None else []) + (
        [json_path] if json_path is not None else [])
    console.print("→ " + ", ".join(map(str, written)) if written else
                  "nothing written: pass --out DIR for strip.json and report.html", highlight=False)


DETECTORS_HELP = ("the guard's detectors: strip, teco, layer-knn, scale-up, ibd-psc (default "
                  "strip,teco,layer-knn); an input is rejected when any of them flags it (--option "
                  "rule=pooled: their evidence is pooled into one decision)")
GUARD_TEMPERATURE_HELP = "STRIP's " + TEMPERATURE_HELP + " (default auto)"
GUARD_OPTION_HELP = ("a guard option KEY=VALUE (repeatable): rule (or/pooled), severity, "
                     "corruptions (a/b/c), scales (3/5/7), copies, amplification, neighbours, batch_size …")
guard_app = typer.Typer(no_args_is_help=True,
                        help="A combined run-time guard: STRIP plus TeCo and layer k-NN (and SCALE-UP, "
                             "IBD-PSC), one calibration at one overall FRR.")
app.add_typer(guard_app, name="guard")


def _guard_options(detectors: str | None, frr: float, n: int | None, temperature: str | None, seed: int,
                   eager: bool, pairs: list[str] | None) -> dict[str, Any]:
    """The Guard's keywords from the command line: the flags given, then each ``--option KEY=VALUE``."""
    given = {"detectors": detectors, "frr": frr, "n": n, "temperature": temperature, "seed": seed,
             "accelerate": False if eager else None}
    return _method_options(GUARDS["guard"], pairs, given, "input guard")


def _print_guard_table(title: str, record: dict[str, Any]) -> None:
    table = Table(title=title)
    for column in ("detector", "FAR alone", "FRR alone", "FAR in the guard", "FRR in the guard"):
        table.add_column(column, justify="left" if column == "detector" else "right")
    for name, d in record["detectors"].items():
        table.add_row(name, _fmt(d["alone"]["far"]), _fmt(d["alone"]["frr"]), _fmt(d["in_guard"]["far"]),
                      _fmt(d["in_guard"]["frr"]))
    table.add_row("[bold]guard[/bold]", "", "", f"[bold]{_fmt(record['far'])}[/bold]",
                  f"[bold]{_fmt(record['frr'])}[/bold]")
    console.print(table)
    t = record["throughput"]
    console.print(f"plain inference {t['plain_inputs_per_second']:.0f} inputs/s; guarded "
                  f"{t['guarded_benign_inputs_per_second']:.0f} benign inputs/s ({t['cost_benign']:.1f}× the "
                  f"cost), {t['guarded_trojaned_inputs_per_second']:.0f} stamped inputs/s", highlight=False)


@guard_app.command("calibrate")
@friendly_errors
def guard_calibrate_cmd(
    model: Path = typer.Argument(..., help="model file"),
    data: str = typer.Option(..., "--data", help="benign data (its training split is used)"),
    out: Path = typer.Option(..., "--out", help="calibration file (.npz)"),
    frr: float = typer.Option(0.01, "--frr", help="overall false-rejection rate of benign inputs"),
    detectors: str = typer.Option(None, "--detectors", help=DETECTORS_HELP),
    n: int = typer.Option(None, "--n", help="STRIP's perturbed copies per input (default 10)"),
    samples: int = typer.Option(2000, "--samples", help="benign calibration images"),
    temperature: str = typer.Option(None, "--temperature", help=GUARD_TEMPERATURE_HELP),
    option: list[str] = typer.Option(None, "--option", help=GUARD_OPTION_HELP),
    seed: int = typer.Option(0, "--seed"),
    mean: str = typer.Option(None, "--mean", help=MEAN_HELP),
    std: str = typer.Option(None, "--std", help=STD_HELP),
    trust_model: bool = typer.Option(False, "--trust-model", help=TRUST_HELP),
    arch: str = typer.Option(None, "--arch", help=ARCH_HELP),
    eager: bool = typer.Option(False, "--eager", help=EAGER_HELP),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
) -> None:
    """Calibrate the detectors and their decision (pooled or OR rule) on benign inputs for one overall FRR."""
    guard = guard_calibrate(model, data, samples=samples, arch=arch, out=out,
                            **_convention(mean, std, trust_model, device),
                            **_guard_options(detectors, frr, n, temperature, seed, eager, option))
    how = (f"their pooled statistic flags {guard.tail_allowed_} of them" if guard.rule == "pooled"
           else f"each flags its {guard.tail_} highest benign scores")
    console.print(f"calibrated {' + '.join(guard.detectors)} on {guard.n_calibration_} benign images for "
                  f"FRR {frr:.1%}: {how} → {out}", highlight=False)


@guard_app.command("check")
@friendly_errors
def guard_check_cmd(
    model: Path = typer.Argument(..., help="model file"),
    calibration: Path = typer.Option(..., "--calibration", help="file from guard calibrate"),
    inputs: str = typer.Option(..., "--inputs", help=INPUTS_HELP),
    key: str = typer.Option(None, "--key", help=KEY_HELP),
    layout: str = typer.Option(None, "--layout", help=LAYOUT_HELP),
    value_range: int = typer.Option(None, "--range", help=RANGE_HELP),
    json_path: Path = typer.Option(None, "--json"),
    mean: str = typer.Option(None, "--mean", help=MEAN_HELP),
    std: str = typer.Option(None, "--std", help=STD_HELP),
    trust_model: bool = typer.Option(False, "--trust-model", help=TRUST_HELP),
    arch: str = typer.Option(None, "--arch", help=ARCH_HELP),
    eager: bool = typer.Option(False, "--eager", help=EAGER_HELP),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
) -> None:
    """Predict each input and flag the trojaned ones, naming the detector that flagged each."""
    found = _read_inputs(inputs, key, layout, value_range)
    record = guard_check(model, calibration, found, arch=arch, accelerate=not eager,
                         **_convention(mean, std, trust_model, device))
    if json_path is not None:
        record.write(json_path)
    by: dict[str, int] = {}
    for row in record.results:
        if row["flagged_by"]:
            by[row["flagged_by"]] = by.get(row["flagged_by"], 0) + 1
    console.print(f"{record['trojaned']} of {record['count']} inputs flagged as trojaned"
                  + (f" ({', '.join(f'{k} {v}' for k, v in by.items())})" if by else "")
                  + f", {record['inputs_per_second']:.0f} inputs/s"
                  + (f" → {json_path}" if json_path else ""), highlight=False)


@guard_app.command("evaluate")
@friendly_errors
def guard_evaluate_cmd(
    model: Path = typer.Argument(..., help="model file"),
    data: str = typer.Option(..., "--data"),
    trigger: Path = typer.Option(None, "--trigger", help="trigger file (default: beside the model)"),
    frr: float = typer.Option(0.01, "--frr"),
    detectors: str = typer.Option(None, "--detectors", help=DETECTORS_HELP),
    n: int = typer.Option(None, "--n", help="STRIP's perturbed copies per input (default 10)"),
    samples: int = typer.Option(2000, "--samples", help="benign and trojaned test inputs each"),
    calibrate_on: str = typer.Option("train", "--calibrate-on",
                                     help="train: held-out training images (as strip evaluate); test: "
                                          "test images the evaluation does not use"),
    temperature: str = typer.Option(None, "--temperature", help=GUARD_TEMPERATURE_HELP),
    option: list[str] = typer.Option(None, "--option", help=GUARD_OPTION_HELP),
    seed: int = typer.Option(0, "--seed"),
    mean: str = typer.Option(None, "--mean", help=MEAN_HELP),
    std: str = typer.Option(None, "--std", help=STD_HELP),
    trust_model: bool = typer.Option(False, "--trust-model", help=TRUST_HELP),
    arch: str = typer.Option(None, "--arch", help=ARCH_HELP),
    out: Path = typer.Option(None, "--out", help="folder for guard.json and report.html"),
    json_path: Path = typer.Option(None, "--json"),
    eager: bool = typer.Option(False, "--eager", help=EAGER_HELP),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
) -> None:
    """FRR on clean and FAR on trigger-stamped test images, for the guard and each detector, and speed."""
    record = guard_evaluate(model, data, trigger, samples=samples, calibration_split=calibrate_on,
                            arch=arch, out_dir=out,
                            **_convention(mean, std, trust_model, device),
                            **_guard_options(detectors, frr, n, temperature, seed, eager, option))
    if json_path is not None:
        record.write(json_path)
    _print_guard_table(f"guard on {model} (FRR target {frr:.1%})", record.to_dict())
    written = ([out / "guard.json", out / "report.html"] if out is not None else []) + (
        [json_path] if json_path is not None else [])
    console.print("→ " + ", ".join(map(str, written)) if written else
                  "nothing written: pass --out DIR for guard.json and report.html", highlight=False)


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks of the detectors over many models.")
app.add_typer(bench_app, name="bench")


@bench_app.command("zoo")
@friendly_errors
def bench_zoo_cmd(
    out: Path = typer.Option(Path("zoo-out"), "--out", help="folder for models, scans and results"),
    data: str = typer.Option(",".join(DEFAULT_DATASETS), "--data",
                             help="comma-separated datasets: names (mnist, fashion-mnist, gtsrb, "
                             "digits) or files/folders"),
    size: int = typer.Option(24, "--size", help="models in the zoo, half of them trojaned"),
    methods: str = typer.Option("neural-cleanse", "--methods",
                                help="comma-separated: " + ", ".join(ZOO_METHODS)),
    repeats: int = typer.Option(1, "--repeats", help="scan each model with this many seeds "
                                "(STRIP runs once)"),
    epochs: int = typer.Option(2, "--epochs", help="training epochs per model"),
    train_samples: int = typer.Option(None, "--train-samples", help="train on a random subset"),
    clean_samples: int = typer.Option(1000, "--clean-samples", help="clean images per scan"),
    schedule: str = typer.Option("default", "--schedule", help="default or paper"),
    steps: int = typer.Option(None, "--steps", help="maximum steps per label"),
    strip_n: int = typer.Option(100, "--strip-n", help="STRIP copies per input"),
    strip_samples: int = typer.Option(500, "--strip-samples", help="STRIP benign/trojaned inputs"),
    strip_temperature: str = typer.Option("1", "--strip-temperature", help="STRIP " + TEMPERATURE_HELP),
    strip_boundary: str = typer.Option("normal", "--strip-boundary",
                                       help="STRIP boundary: normal (the authors') or quantile"),
    seed: int = typer.Option(0, "--seed", help="seed of the zoo specification and the scans"),
    preset: str = typer.Option("classic", "--preset", help="classic (the paper's CNN, patches and "
                               "blends) or world (4 architecture families, normalised-input models, "
                               "more attack kinds)"),
    attacks: str = typer.Option(None, "--attacks", help="world: comma-separated attack kinds to draw "
                                "in turn (default: its ten; more: " + ", ".join(MORE_ZOO_ATTACKS) + ")"),
    archs: str = typer.Option(None, "--archs", help="world: comma-separated architectures to turn "
                              "through (default: cnn,mlp,resnet-small,mobilenet-small; cnn is the "
                              "paper's net for the data; also vgg-gap, resnet-flat: another head)"),
    runner: str = typer.Option("local", "--runner", help=RUNNER_HELP),
    workers: int = typer.Option(1, "--workers", help=WORKERS_HELP),
    address: str = typer.Option(None, "--address", help=ADDRESS_HELP),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    precision: str = typer.Option("float32", "--precision", help=PRECISION_HELP + "; float32 by default "
                                  "here, so that a zoo's figures are the same on every machine"),
) -> None:
    """Build a seeded zoo of clean and trojaned models (cached; rerun to resume), scan each, and
    report AUROC, detection and false-positive rates, target accuracy, trigger IoU and seconds."""
    options = ZooOptions(datasets=[d.strip() for d in data.split(",") if d.strip()], size=size,
                         seed=seed, methods=[m.strip() for m in methods.split(",") if m.strip()],
                         repeats=repeats, epochs=epochs, train_samples=train_samples,
                         clean_samples=clean_samples, schedule=schedule, steps=steps,
                         strip_n=strip_n, strip_samples=strip_samples,
                         strip_temperature=strip_temperature, strip_boundary=strip_boundary,
                         preset=preset, runner=runner, workers=workers, address=address, device=device,
                         precision=precision,
                         attacks=[k.strip() for k in attacks.split(",") if k.strip()] if attacks else None,
                         archs=[k.strip() for k in archs.split(",") if k.strip()] if archs else None)
    with folder_lock(out, "zoo folder"):
        results = run_zoo(out, options, log=lambda line: console.print(line, highlight=False))
    console.print((out / "summary.md").read_text().split("\n\n| model")[0])
    console.print(f"→ {out / 'results.json'}, {out / 'summary.md'}, {out / 'report.html'}")
    if results.get("failed_attacks"):
        err_console.print("some attacks did not take; see summary.md")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
