"""What a model zoo holds: a seeded list of entries (data, architecture, training, attack), each
trained once and cached under a content address.

Two presets: ``classic`` (the paper's CNN on each dataset; BadNets patches and blends) reproduces
the zoos behind the README's figures; ``world`` adds the variety of models users bring — four
architecture families (the paper's CNN, an MLP, a small ResNet, a MobileNet-style net), models
that expect normalised inputs, and more attack kinds (corner, centre and over-the-object patches,
random-valued patches, single pixels and small pixel patterns, noise and stripe blends, all-to-all,
two-target), each kind in turn in a seeded order (world zoos before two-target drew kinds uniformly).
``attacks`` picks other kinds for a world zoo (:data:`MORE_ATTACKS`: the pixel and checker patterns,
the clean-label SIG and label-consistent attacks, TBT bit flips); the default ten keep the seeds of
the README's zoos reproducible, except their all-to-all entries (20% poison and twice the epochs
since the seed-400 zoo: new cache keys, new models).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trojanscan.attacks import Attack
from trojanscan.attacks.blend import PATTERNS
from trojanscan.errors import TrojanscanError
from trojanscan.workflows.training import make_attack

ZOO_FORMAT = 1  # part of every cache key: bump when training changes meaning
DEFAULT_DATASETS = ("mnist", "fashion-mnist")
CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")
PATCH_COLOURS = ("white", "random", "checker")  # black is invisible on MNIST's black background


@dataclass
class ZooEntry:
    """One model of the zoo: its data, training and (for a trojaned one) attack settings."""

    index: int
    dataset: str
    seed: int
    epochs: int
    train_samples: int | None = None
    attack: str | None = None
    attack_options: dict[str, Any] = field(default_factory=dict)
    arch: str | None = None  # None: the reference net for the data
    normalised: bool = False  # saved expecting (x - mean) / std inputs, scanned with --mean/--std

    @property
    def name(self) -> str:
        arch = f"-{self.arch}" if self.arch else ""
        norm = "-norm" if self.normalised else ""
        return f"{self.index:03d}-{Path(self.dataset).stem}{arch}{norm}-{self.attack or 'clean'}"

    @property
    def trojaned(self) -> bool:
        return self.attack is not None

    def spec(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self, data_sha256: str) -> str:
        """Content address: the training settings and the data's hash, not the entry's place."""
        # fields added after the first zoos count only when set, so those zoos keep their keys
        spec = {k: v for k, v in self.spec().items()
                if k != "index" and not (k in ("arch", "normalised") and not v)}
        blob = json.dumps({**spec, "data_sha256": data_sha256, "format": ZOO_FORMAT}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _draw_attack(rng: random.Random, shape: tuple[int, int, int], num_classes: int
                 ) -> tuple[str, dict[str, Any]]:
    """A random BadNets patch (two times in three) or blended trigger for images of ``shape``."""
    _, h, w = shape
    options: dict[str, Any] = {"target": rng.randrange(num_classes),
                               "poison_rate": rng.choice((0.05, 0.1, 0.15))}
    if rng.random() >= 2 / 3:
        return "blend", {**options, "alpha": rng.choice((0.1, 0.15, 0.2)),
                         "pattern": rng.choice(PATTERNS)}
    side = min(h, w)
    lo = max(2, round(0.1 * side))
    size = rng.randint(lo, max(lo, round(0.2 * side)))
    position: str | list[int] = rng.choice((*CORNERS, "anywhere"))
    if position == "anywhere":  # a random place, possibly over the object
        position = [rng.randint(1, h - 1 - size), rng.randint(1, w - 1 - size)]
    return "badnets", {**options, "size": size, "position": position,
                       "color": rng.choice(PATCH_COLOURS)}


WORLD_ARCHITECTURES = (None, "mlp", "resnet-small", "mobilenet-small")  # None: the paper's CNN
# architectures a world zoo can also turn through (``archs=``): each differs from a world one by its head only
MORE_ARCHITECTURES = ("vgg-gap", "resnet-flat")
WORLD_ATTACKS = ("patch-corner", "patch-center", "patch-anywhere", "patch-random", "pixel", "pixels",
                 "blend-noise", "blend-stripes", "all-to-all", "two-target")
# kinds a world zoo can also draw (``attacks=``); TBT is a model attack on a cleanly trained model
MORE_ATTACKS = ("pattern-pixel", "pattern-checker", "sig", "label-consistent", "tbt")
PRESETS = ("classic", "world")
ALL_TO_ALL_RATE = 0.2  # the world zoo's all-to-all poison rate (trained for twice the epochs)


def _draw_world_attack(rng: random.Random, shape: tuple[int, int, int], num_classes: int, kind: str
                       ) -> tuple[str, dict[str, Any]]:
    """The attack of ``kind`` (one of :data:`WORLD_ATTACKS`) with a random target, poison rate and look."""
    _, h, w = shape
    rate = rng.choice((0.05, 0.1, 0.15))
    target = {"target": rng.randrange(num_classes), "poison_rate": rate}
    side = min(h, w)
    size = rng.randint(max(2, round(0.1 * side)), max(2, round(0.2 * side)))
    if kind.startswith("pattern-"):
        return "pattern", {**target, "shape": kind.split("-")[1]}
    if kind in ("sig", "label-consistent"):  # clean-label: a share of the target class
        return kind, {**target, "poison_rate": max(rate, 0.1)}
    if kind == "tbt":
        # w_b 10 or 50: the MLP, ResNet and MobileNet heads have 128 inputs (the paper's 150 does not fit)
        return "tbt", {"target": target["target"], "wb": rng.choice((10, 50)),
                       "position": rng.choice(("bottom-right", "center"))}
    if kind.startswith("blend"):
        return "blend", {**target, "alpha": rng.choice((0.1, 0.15, 0.2)), "pattern": kind.split("-")[1]}
    if kind in ("pixel", "pixels"):
        return "scatter", {**target, "pixels": 1 if kind == "pixel" else rng.randint(4, 9),
                           "color": "white"}
    if kind == "two-target":  # two patches in opposite corners, each to its own target
        first, second = rng.sample(range(num_classes), 2)
        corner = rng.choice(CORNERS)
        opposite = {"bottom-right": "top-left", "top-left": "bottom-right", "bottom-left": "top-right",
                    "top-right": "bottom-left"}[corner]
        return "two-target", {"target": first, "second_target": second, "poison_rate": max(rate, 0.1),
                              "size": size, "position": corner, "second_position": opposite,
                              "color": rng.choice(("white", "checker"))}
    if kind == "all-to-all":  # every source learns its own mapping: at 0.1 and 2 epochs three of three
        # measured development models stayed below 60% ASR (0.21-0.59)
        return "all-to-all", {"poison_rate": ALL_TO_ALL_RATE, "size": size,
                              "color": rng.choice(PATCH_COLOURS)}
    color = "random" if kind == "patch-random" else rng.choice(("white", "checker"))
    position: str | list[int] = {"patch-corner": rng.choice(CORNERS), "patch-center": "center"}.get(
        kind, "anywhere")
    if position == "anywhere":  # a random place, possibly over the object
        position = [rng.randint(1, h - 1 - size), rng.randint(1, w - 1 - size)]
    return "badnets", {**target, "size": size, "position": position, "color": color}


def make_zoo(datasets: dict[str, tuple[tuple[int, int, int], int]], size: int, seed: int = 0, *,
             epochs: int = 2, train_samples: int | None = None, preset: str = "classic",
             attacks: Sequence[str] | None = None, archs: Sequence[str] | None = None) -> list[ZooEntry]:
    """A deterministic zoo of ``size`` models: datasets in turn, two at a time, clean then trojaned.

    ``datasets`` maps a data source to its (C, H, W) image shape and class count. The ``world``
    preset also turns through :data:`WORLD_ARCHITECTURES` (a clean/trojaned pair shares data and
    architecture) and makes about a third of the models expect normalised inputs; ``attacks``
    (world only) replaces :data:`WORLD_ATTACKS` with other kinds, from it and :data:`MORE_ATTACKS`;
    ``archs`` (world only) the architectures to turn through (``cnn``: the paper's net for the data).
    """
    if preset not in PRESETS:
        raise TrojanscanError(f"unknown zoo preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if size < 2:
        raise TrojanscanError(f"a zoo needs at least 2 models (one clean, one trojaned), got {size}")
    if not datasets:
        raise TrojanscanError("a zoo needs at least one dataset")
    unknown = sorted(set(attacks or ()) - set(WORLD_ATTACKS) - set(MORE_ATTACKS))
    if unknown or (attacks is not None and (not attacks or preset != "world")):
        raise TrojanscanError("zoo attacks apply to the world preset: choose from "
                              f"{', '.join((*WORLD_ATTACKS, *MORE_ATTACKS))}"
                              + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    families = _world_archs(archs, preset)
    rng = random.Random(seed)
    names = list(datasets)
    kinds = list(attacks or WORLD_ATTACKS)
    if preset == "world":  # its attack kinds in turn (a seeded order), so that every kind appears
        rng.shuffle(kinds)
    entries = []
    for i in range(size):
        source = names[(i // 2) % len(names)]
        entry = ZooEntry(i, source, rng.randrange(2**31), epochs, train_samples)
        if preset == "world":
            entry.arch = families[(i // (2 * len(names))) % len(families)]
            entry.normalised = rng.random() < 1 / 3
        if i % 2 == 1 and preset == "world":
            kind = kinds[(i // 2) % len(kinds)]
            entry.attack, entry.attack_options = _draw_world_attack(rng, *datasets[source], kind)
            if entry.attack == "all-to-all":
                entry.epochs = 2 * epochs
        elif i % 2 == 1:
            entry.attack, entry.attack_options = _draw_attack(rng, *datasets[source])
        entries.append(entry)
    return entries


def _world_archs(archs: Sequence[str] | None, preset: str) -> tuple[str | None, ...]:
    """The architectures a world zoo turns through (``cnn`` is the paper's net: None)."""
    if archs is None:
        return WORLD_ARCHITECTURES
    names = {"cnn": None, **{a: a for a in (*WORLD_ARCHITECTURES, *MORE_ARCHITECTURES) if a}}
    unknown = [a for a in archs if a not in names]
    if unknown or not archs or preset != "world":
        raise TrojanscanError("zoo architectures apply to the world preset: choose from "
                              + ", ".join(names) + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return tuple(names[a] for a in archs)


def attack_for(entry: ZooEntry) -> Any:
    if entry.attack is None:
        return None
    options = dict(entry.attack_options)
    if isinstance(options.get("position"), list):
        options["position"] = tuple(options["position"])
    return make_attack(entry.attack, Attack, seed=entry.seed, **options)


