"""Teacher training with Ray Train: the driver (`trainer`), the per-worker loop (`loop`) and its Ray-free
steps, the typed worker config, checkpoints of every strategy (`checkpoint`). Tests' loop hooks: `testing`."""

from raysys.train.trainer import TeacherResult, train_teacher

__all__ = ["TeacherResult", "train_teacher"]
