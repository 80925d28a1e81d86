"""The jobs a user runs, one module each: resolving inputs, training, attacking a model, scanning,
guarding at run time, repairing. ``trojanscan.api`` re-exports the public functions."""
