"""Datasets: load train/test image data from disk (or the built-in digits) and validate it."""

from trojanscan.data.dataset import (
    DATA_DIR_ENV,
    Dataset,
    default_data_dir,
    load_dataset,
    validate_arrays,
)

__all__ = ["DATA_DIR_ENV", "Dataset", "default_data_dir", "load_dataset", "validate_arrays"]
