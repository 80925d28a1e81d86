"""Reference architectures and safe model files."""

from trojanscan.models.architectures import (
    ARCHITECTURES,
    ArchSpec,
    Normalize,
    ReferenceNet,
    build_model,
    default_arch,
)
from trojanscan.models.io import (
    ARCH_HELP,
    ArchLike,
    LoadedModel,
    check_save_target,
    import_architecture,
    load_model,
    save_model,
    sniff_model_format,
)

__all__ = [
    "ARCHITECTURES", "ARCH_HELP", "ArchLike", "ArchSpec", "LoadedModel", "Normalize", "ReferenceNet",
    "build_model", "check_save_target", "default_arch", "import_architecture", "load_model", "save_model",
    "sniff_model_format",
]
