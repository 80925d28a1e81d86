"""TrojanNN on the reference nets: both masks, reverse-engineered vs real retraining data, and how
Fine-Pruning and the autoencoder input guard fare against each attacked model.

    python benchmarks/trojannn.py --data mnist,gtsrb --out benchmarks/results/trojannn.json

Per dataset one clean reference net is trained (kept in ``--models-dir`` and reused), the training
inputs are reverse-engineered from it once (shared by both masks, as the attack would make the same
ones), then TrojanNN runs per mask × data source on a copy. Every figure is on the test split, which
neither the attack nor the defences see. Goal (issue 16): ASR ≥ 95% with clean accuracy within 3
points of the clean model, for both masks. Set ``TROJANSCAN_DATA_DIR``; run with
``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from trojanscan import load_dataset, train_classifier
from trojanscan.attacks import TrojanNN
from trojanscan.attacks.trojannn import reverse_engineer_inputs
from trojanscan.data import Dataset
from trojanscan.data.triggers import Trigger
from trojanscan.defenses.autoencoder_guard import AutoencoderGuard
from trojanscan.defenses.fine_pruning import fine_prune
from trojanscan.fileio import write_json
from trojanscan.models import load_model, save_model
from trojanscan.train import evaluate
from trojanscan.workflows.inputs import held_out
from trojanscan.workflows.records import environment

EPOCHS = {"mnist": 2, "gtsrb": 6}  # the clean nets' training (train_zoo's GTSRB setting)
PER_LABEL = {"mnist": 100, "gtsrb": 50}  # reverse-engineered inputs per label (43 GTSRB labels)


class _SharedInputs(TrojanNN):
    """TrojanNN whose reverse-engineered inputs were made once for the model (the same call)."""

    def __init__(self, shared: tuple[torch.Tensor, torch.Tensor], **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.shared = shared

    def attacker_data(self, model: torch.nn.Module, data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        return self.shared if self.data_source == "reversed" else super().attacker_data(model, data)


def clean_model(source: str, data: Dataset, models_dir: Path) -> tuple[torch.nn.Module, float]:
    """The dataset's clean reference net: loaded from ``models_dir`` or trained and saved there."""
    path = models_dir / f"{source}-clean.safetensors"
    if path.exists():
        return load_model(path).module, 0.0
    start = time.perf_counter()
    trained = train_classifier(data, None, epochs=EPOCHS.get(source, 15), seed=0, progress=False)
    models_dir.mkdir(parents=True, exist_ok=True)
    save_model(trained.model, path)
    return trained.model, time.perf_counter() - start


def defences(model: torch.nn.Module, trigger: Trigger, data: Dataset, seed: int = 0) -> dict[str, object]:
    """Fine-Pruning (paper settings: 4-point budget) and the autoencoder guard on one attacked model."""
    x, y = held_out(data, "mitigation", 2000, seed)
    stamped = trigger.apply(data.x_test[data.y_test != trigger.target])
    start = time.perf_counter()
    fp = fine_prune(model, x, y, data.x_train, data.y_train, max_accuracy_drop=0.04, real_trigger=trigger)
    after = evaluate(fp.model, data.x_test, data.y_test, trigger)
    pruned_only = evaluate(fp.pruned_model, data.x_test, data.y_test, trigger)
    fp_seconds = time.perf_counter() - start
    start = time.perf_counter()
    guard = AutoencoderGuard(model).fit(x)
    labels, flags = guard.predict(stamped)
    hit = labels == trigger.target
    recon_labels = guard.predict(data.x_test)[0]
    return {
        "fine_pruning": {"pruned": len(fp.pruned), "units": fp.units, "layer": fp.layer,
                         "clean_accuracy": after["clean_accuracy"], "asr": after["attack_success_rate"],
                         "pruned_only_clean_accuracy": pruned_only["clean_accuracy"],
                         "pruned_only_asr": pruned_only["attack_success_rate"], "seconds": fp_seconds},
        "autoencoder_guard": {"frr": float(guard.detect(data.x_test).float().mean()),
                              "detection_rate": float(flags.float().mean()),
                              "asr_on_reconstructions": float(hit.float().mean()),
                              "asr_undetected": float((hit & ~flags).float().mean()),
                              "clean_accuracy_on_reconstructions": float((recon_labels == data.y_test)
                                                                         .float().mean()),
                              "calibration_frr": guard.calibration_frr_,
                              "seconds": time.perf_counter() - start},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="mnist,gtsrb")
    ap.add_argument("--masks", default="square,watermark")
    ap.add_argument("--sources", default="reversed,real")
    ap.add_argument("--target", type=int, default=3)
    ap.add_argument("--per-label", type=int, default=None,
                    help="reverse-engineered inputs per label (default: 100 for MNIST, 50 for GTSRB)")
    ap.add_argument("--no-defences", action="store_true",
                    help="skip Fine-Pruning and the autoencoder guard")
    ap.add_argument("--models-dir", type=Path, default=Path("bench_out/trojannn"))
    ap.add_argument("--out", type=Path, default=Path("bench_out/trojannn.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows: list[dict[str, object]] = []
    prepared: dict[str, dict[str, float]] = {}
    for source in args.data.split(","):
        data = load_dataset(source)
        model, train_seconds = clean_model(source, data, args.models_dir)
        clean_ca = evaluate(model, data.x_test, data.y_test)["clean_accuracy"]
        start = time.perf_counter()
        options = {"target": args.target, "per_label": args.per_label or PER_LABEL.get(source, 100)}
        reference = TrojanNN(**options)  # type: ignore[arg-type]
        shared = reverse_engineer_inputs(model, data.input_shape, data.num_classes,
                                         per_label=reference.per_label, steps=reference.reverse_steps,
                                         seed=reference.seed)
        prepared[source] = {"clean_accuracy": clean_ca, "train_seconds": train_seconds,
                            "reverse_seconds": time.perf_counter() - start, "reversed_inputs": len(shared[0])}
        print(f"{source}: clean CA {clean_ca:.4f}, {len(shared[0])} reversed inputs in "
              f"{prepared[source]['reverse_seconds']:.0f} s", flush=True)
        for mask in args.masks.split(","):
            for data_source in args.sources.split(","):
                attack = _SharedInputs(shared, **options, mask=mask, data_source=data_source)
                start = time.perf_counter()
                attacked, trigger = attack.apply(model, data)
                r = attack.report_
                row: dict[str, object] = {
                    "data": source, "mask": mask, "data_source": data_source, "target": args.target,
                    "clean_accuracy_before": r["before"]["clean_accuracy"],
                    "asr_before": r["before"]["attack_success_rate"],
                    "clean_accuracy_after": r["after"]["clean_accuracy"],
                    "asr_after": r["after"]["attack_success_rate"],
                    "trigger_pixels": r["trigger_pixels"], "trigger_area": r["trigger_area"],
                    "layer": r["layer"], "neurons": r["neurons"], "retrained": r["retrained"],
                    "attacker_images": r["attacker_images"], "clean_activation": r["clean_activation"],
                    "trigger_activation": r["trigger_activation"], "goal_activation": r["goal"],
                    "seconds": time.perf_counter() - start + (prepared[source]["reverse_seconds"]
                                                              if data_source == "reversed" else 0.0)}
                row["goal_met"] = bool(r["after"]["attack_success_rate"] >= 0.95
                                       and r["after"]["clean_accuracy"] >= clean_ca - 0.03)
                if not args.no_defences:
                    row["defences"] = defences(attacked, trigger, data)
                rows.append(row)
                print(f"{source:6s} {mask:9s} {data_source:8s}: CA {clean_ca:.4f} → "
                      f"{row['clean_accuracy_after']:.4f}, ASR {row['asr_before']:.4f} → "
                      f"{row['asr_after']:.4f}, {row['trigger_pixels']} px "
                      f"({100 * r['trigger_area']:.1f}%), goal "
                      f"{'met' if row['goal_met'] else 'NOT met'}; {row['seconds']:.0f} s", flush=True)
                write_json(args.out, {"benchmark": "trojannn", "options": vars(args) | {
                    "out": str(args.out), "models_dir": str(args.models_dir)}, "environment": environment(),
                    "datasets": prepared, "runs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
