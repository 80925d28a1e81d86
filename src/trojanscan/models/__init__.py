"""Reference architectures and safe model files."""

from trojanscan.models.architectures import (
    ARCHITECTURES,
    ArchSpec,
    Normalize,
    ReferenceNet,
    build_model,
    default_arch,
)
from trojanscan.models.io import LoadedModel, load_model, save_model, sniff_model_format

__all__ = [
    "ARCHITECTURES", "ArchSpec", "LoadedModel", "Normalize", "ReferenceNet", "build_model",
    "default_arch", "load_model", "save_model", "sniff_model_format",
]
