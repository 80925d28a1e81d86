"""Defences: they see only a model and clean data, never an attack's internals."""
