"""The autoencoder input guard of "Neural Trojans" (Liu, Xie, Srivastava, ICCD 2017): an autoencoder
trained on clean inputs only reconstructs every input before the model sees it. A trigger is unlike
anything it was trained on, so it comes out blurred away (and the model predicts the true label), or
it survives with a reconstruction error far above that of clean inputs.

The paper uses the reconstruction only as preprocessing; this guard also flags inputs (``rule``):
``"error"``: reconstruction error (mean squared, per image) above the benign ``1 − frr`` quantile,
measured on benign images held out of the autoencoder's training (``holdout``); ``"prediction"``:
the model's label changes after reconstruction; ``"either"`` (default): one or the other, so the
benign rejection rate is about ``frr`` plus the share of benign inputs whose label the
reconstruction changes (``calibration_frr_`` says how much on the held-out images).

Example::

    guard = AutoencoderGuard(model).fit(clean_images)
    labels, rejected = guard.predict(incoming_images)  # labels of the reconstructions
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from trojanscan.defenses.base import InputGuard
from trojanscan.errors import TrojanscanError, TrojanscanWarning
from trojanscan.fileio import load_npz_record, module_sha256, save_npz_record
from trojanscan.train import predict as predict_labels
from trojanscan.validation import SEED, check_choice, check_fraction, check_images, check_number

RULES = ("either", "error", "prediction")
FILE_FORMAT_VERSION = 1
MIN_BENIGN_IMAGES = 20
_WEIGHT_PREFIX = "ae."
_MAX_MEMBER_BYTES = 1 << 26


class ConvAutoencoder(nn.Module):
    """Two stride-2 convolutions down to ``code`` channels at a quarter of the side, two transposed
    convolutions back up, a sigmoid to [0, 1]; the output is cropped to the input's size."""

    def __init__(self, channels: int, width: int = 16, code: int = 4) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(channels, width, 3, 2, 1), nn.ReLU(),
                                     nn.Conv2d(width, code, 3, 2, 1), nn.ReLU())
        self.decoder = nn.Sequential(nn.ConvTranspose2d(code, width, 3, 2, 1, output_padding=1), nn.ReLU(),
                                     nn.ConvTranspose2d(width, channels, 3, 2, 1, output_padding=1),
                                     nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return self.decoder(self.encoder(x))[..., :h, :w]


def train_autoencoder(x: torch.Tensor, *, width: int = 16, code: int = 4, steps: int = 1000, lr: float = 1e-3,
                      batch_size: int = 64, seed: int = 0) -> ConvAutoencoder:
    """A :class:`ConvAutoencoder` fitted to images ``x`` (mean squared error, Adam, ``steps`` random
    batches); returned in eval mode with frozen weights."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ae = ConvAutoencoder(x.shape[1], width, code)
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    for _ in range(steps):
        xb = x[torch.randint(len(x), (min(batch_size, len(x)),), generator=gen)]
        loss = F.mse_loss(ae(xb), xb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in ae.parameters():
        p.requires_grad_(False)
    return ae.eval()


@dataclass(frozen=True)
class AutoencoderGuardOptions:
    """The autoencoder guard's settings (the constructor's keywords; see :class:`AutoencoderGuard`)."""

    frr: float = 0.01
    rule: str = "either"
    width: int | None = None  # None: 16 per input channel
    code_channels: int | None = None  # None: 4 per input channel
    steps: int = 1000
    lr: float = 1e-3
    batch_size: int = 64
    holdout: float = 0.2
    seed: int = 0


class AutoencoderGuard(InputGuard):
    """Reconstruct inputs with an autoencoder trained on benign ones; flag and relabel them.

    Args:
        model: the (suspect) classifier, images in [0, 1] → logits.
        frr: false rejection rate of benign inputs that sets the error threshold.
        rule: ``"either"``, ``"error"`` or ``"prediction"`` (see the module notes).
        width, code_channels: the autoencoder's hidden and bottleneck channels (None: 16 and 4 per
            input channel; on GTSRB, 4 bottleneck channels blurred 38% of clean images into another
            label, 12 about 8%).
        steps, lr, batch_size: its training (Adam on random batches).
        holdout: share of the benign images kept out of training to set the threshold.
        seed: seeds the split and the training.
    """

    name = "autoencoder"
    title = "autoencoder input guard (Neural Trojans)"
    options_type = AutoencoderGuardOptions

    def __init__(self, model: nn.Module, frr: float = 0.01, rule: str = "either", width: int | None = None,
                 code_channels: int | None = None, steps: int = 1000, lr: float = 1e-3, batch_size: int = 64,
                 holdout: float = 0.2, seed: int = 0) -> None:
        if not isinstance(model, nn.Module):
            raise TrojanscanError(f"model must be a torch nn.Module, got {type(model).__name__}")
        check_fraction("frr", frr)
        check_fraction("holdout", holdout)
        check_choice("autoencoder guard rule", rule, RULES)
        for name, value in (("width", width), ("code_channels", code_channels), ("steps", steps),
                            ("batch_size", batch_size)):
            if value is None and name in ("width", "code_channels"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
                raise TrojanscanError(f"{name} must be a whole number from 1 to 1000000, got {value!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise TrojanscanError(f"lr must be a positive number, got {lr!r}")
        check_number("seed", seed, SEED)
        self.model = model
        self.frr, self.rule, self.width, self.code_channels = float(frr), rule, width, code_channels
        self.steps, self.lr, self.batch_size = steps, float(lr), batch_size
        self.holdout, self.seed = float(holdout), int(seed)

    # -- fitting ----------------------------------------------------------------------------------

    def fit(self, x: torch.Tensor) -> AutoencoderGuard:  # type: ignore[override]
        """Train the autoencoder on benign images ``x`` (less the held-out share) and set the threshold
        on the held-out ones. Returns ``self`` with ``autoencoder_``, ``threshold_``,
        ``calibration_frr_``, ``input_shape_`` and ``model_sha256_`` set."""
        check_images(x, "benign images")
        if len(x) < MIN_BENIGN_IMAGES:
            raise TrojanscanError(f"the autoencoder guard needs at least {MIN_BENIGN_IMAGES} benign images, "
                                  f"got {len(x)}; pass more clean images")
        x = x.detach().to("cpu", torch.float32)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_held = max(MIN_BENIGN_IMAGES // 2, round(self.holdout * len(x)))
        held, train = x[order[:n_held]], x[order[n_held:]]
        width, code = self._sizes(x.shape[1])
        self.autoencoder_ = train_autoencoder(train, width=width, code=code, steps=self.steps, lr=self.lr,
                                              batch_size=self.batch_size, seed=self.seed)
        self.input_shape_ = tuple(int(s) for s in x.shape[1:])
        errors = self.errors(held)
        self.threshold_ = float(torch.quantile(errors.double(), 1 - self.frr))
        self.model_sha256_ = module_sha256(self.model)
        self.calibration_frr_ = float(self.detect(held).float().mean())
        self.n_fit_ = len(x)
        if self.calibration_frr_ > max(2 * self.frr, self.frr + 0.05):
            warnings.warn(f"the autoencoder guard rejects {self.calibration_frr_:.1%} of held-out benign "
                          f"images (asked {self.frr:.1%}): its reconstructions change the model's label; "
                          "train it longer or use rule 'error'", TrojanscanWarning, stacklevel=2)
        return self

    def _sizes(self, channels: int) -> tuple[int, int]:
        """The autoencoder's hidden and bottleneck channels for images of ``channels`` channels."""
        return self.width or 16 * channels, self.code_channels or 4 * channels

    def _require_fitted(self, attribute: str = "threshold_") -> None:
        if not hasattr(self, attribute):
            raise TrojanscanError("this autoencoder guard is not fitted; call fit(clean_images) or "
                                  "AutoencoderGuard.load(path, model) first")

    # -- scoring ----------------------------------------------------------------------------------

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """The autoencoder's reconstruction of each image (what the model is shown)."""
        self._require_fitted("autoencoder_")
        check_images(x, "input images")
        if tuple(x.shape[1:]) != self.input_shape_:
            raise TrojanscanError(f"input images are {tuple(x.shape[1:])} but the guard was fitted on "
                                  f"{self.input_shape_}; pass images of that size")
        x = x.detach().to("cpu", torch.float32)
        out = [self.autoencoder_(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        return torch.cat(out) if out else torch.empty_like(x)

    def errors(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image mean squared reconstruction error."""
        return (self.reconstruct(x) - x.detach().to("cpu", torch.float32)).pow(2).flatten(1).mean(1)

    def _judge(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The labels of the reconstructions and the flags of ``rule``."""
        self._require_fitted()
        recon = self.reconstruct(x)
        labels = predict_labels(self.model, recon)
        flags = torch.zeros(len(x), dtype=torch.bool)
        if self.rule in ("error", "either"):
            flags |= (recon - x.detach().to("cpu", torch.float32)).pow(2).flatten(1).mean(1) > self.threshold_
        if self.rule in ("prediction", "either"):
            flags |= predict_labels(self.model, x) != labels
        return labels, flags

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """True where an input is rejected (by ``rule``)."""
        return self._judge(x)[1]

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's labels for the reconstructions (the paper's defence) and the guard's flags."""
        return self._judge(x)

    # -- persistence ------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Save the autoencoder's weights and the calibration as plain arrays (no pickles), atomically."""
        self._require_fitted()
        weights = {_WEIGHT_PREFIX + k: v.numpy() for k, v in self.autoencoder_.state_dict().items()}
        save_npz_record(path, {
            "format_version": np.int64(FILE_FORMAT_VERSION), "frr": np.float64(self.frr), "rule": self.rule,
            "width": np.int64(self.width or 0), "code_channels": np.int64(self.code_channels or 0),  # 0: auto
            "steps": np.int64(self.steps), "lr": np.float64(self.lr), "batch_size": np.int64(self.batch_size),
            "holdout": np.float64(self.holdout), "seed": np.int64(self.seed),
            "threshold": np.float64(self.threshold_), "calibration_frr": np.float64(self.calibration_frr_),
            "n_fit": np.int64(self.n_fit_), "input_shape": np.asarray(self.input_shape_, dtype=np.int64),
            "model_sha256": self.model_sha256_, **weights})

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module) -> AutoencoderGuard:
        """Read a guard saved by :meth:`save` for the same ``model``; never unpickles."""
        path = Path(path)
        f = load_npz_record(path, "autoencoder guard", _FIELDS, max_member_bytes=_MAX_MEMBER_BYTES,
                            fix="; refit the guard")
        try:
            version = int(f["format_version"])
            shape = tuple(int(s) for s in np.asarray(f["input_shape"]).reshape(-1))
            guard = cls(model, frr=float(f["frr"]), rule=str(f["rule"]), width=int(f["width"]) or None,
                        code_channels=int(f["code_channels"]) or None, steps=int(f["steps"]),
                        lr=float(f["lr"]), batch_size=int(f["batch_size"]), holdout=float(f["holdout"]),
                        seed=int(f["seed"]))
            threshold, n_fit = float(f["threshold"]), int(f["n_fit"])
            calibration = float(f["calibration_frr"])
            sha = str(f["model_sha256"])
            if len(shape) != 3 or min(shape) < 1:
                raise ValueError(f"input shape {shape} is not C, H, W")
            ae = ConvAutoencoder(shape[0], *guard._sizes(shape[0]))
            state = ae.state_dict()
            given = {k[len(_WEIGHT_PREFIX):]: v for k, v in f.items() if k.startswith(_WEIGHT_PREFIX)}
            if set(given) != set(state) or any(given[k].shape != tuple(v.shape) for k, v in state.items()):
                raise ValueError("the autoencoder's weights do not match its settings")
            ae.load_state_dict({k: torch.from_numpy(np.asarray(given[k], dtype=np.float32)) for k in state})
        except TrojanscanError as e:
            raise TrojanscanError(f"{path}: {e}") from None
        except Exception as e:  # wrong dtypes or shapes in a damaged file
            raise TrojanscanError(f"{path}: not an autoencoder guard file ({type(e).__name__}: "
                                  f"{e})") from None
        if version != FILE_FORMAT_VERSION:
            raise TrojanscanError(f"{path}: autoencoder guard format {version} is not supported; refit it")
        if not math.isfinite(threshold) or not all(torch.isfinite(v).all() for v in ae.state_dict().values()):
            raise TrojanscanError(f"{path}: threshold or weights not finite; the file is damaged, refit it")
        if sha != module_sha256(model):
            raise TrojanscanError(f"{path}: fitted for a different model (weights differ); refit the guard "
                                  "on this model")
        for p in ae.parameters():
            p.requires_grad_(False)
        guard.autoencoder_, guard.input_shape_, guard.threshold_ = ae.eval(), shape, threshold
        guard.calibration_frr_, guard.n_fit_, guard.model_sha256_ = calibration, n_fit, sha
        return guard


_FIELDS = ("format_version", "frr", "rule", "width", "code_channels", "steps", "lr", "batch_size", "holdout",
           "seed", "threshold", "calibration_frr", "n_fit", "input_shape", "model_sha256")
