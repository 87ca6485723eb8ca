"""raysys: a Ray-native MLOps loop (data -> teacher -> distillation -> registry -> serve -> monitor)."""

__version__ = "0.1.0"
