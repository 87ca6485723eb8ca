"""Teacher training with Ray Train: the per-worker loop, TorchTrainer wiring, safetensors checkpoints."""

from raysys.train.trainer import TeacherResult, train_teacher

__all__ = ["TeacherResult", "train_teacher"]
