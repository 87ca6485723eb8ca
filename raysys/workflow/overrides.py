"""Command-line flags -> config overrides, shared by the `raysys` CLI and the jobs so both take the same
flags with the same meaning. The config validates the result and names a wrong field."""

from __future__ import annotations

TEACHER_FAMILIES = ("mlp", "ft_transformer")
TEACHER_SIZES = ("tiny", "small", "base", "large")


def train_overrides(strategy: str | None = None, workers: int | None = None, dp: int | None = None,
                    tp: int | None = None, pp: int | None = None, max_worker_memory_gb: float | None = None,
                    teacher_family: str | None = None, teacher_size: str | None = None, *,
                    gpu: bool = False) -> dict | None:
    """`train:` and `teacher:` config overrides from the flags shared by `raysys train` and the
    train_teacher job. A `teacher_size` without a family means ft_transformer (the family with sizes); `gpu`:
    train.use_gpu (one GPU per worker)."""
    out: dict = {}
    teacher: dict = {}
    if teacher_family:
        teacher["family"] = teacher_family
    if teacher_size:
        teacher["size"] = teacher_size
        teacher.setdefault("family", "ft_transformer")
    if teacher:
        out["teacher"] = teacher
    train: dict = {}
    if strategy:
        train["strategy"] = strategy
    if workers:
        train["num_workers"] = workers
    parallel = {k: v for k, v in (("dp", dp), ("tp", tp), ("pp", pp)) if v}
    if parallel:
        train["parallel"] = parallel
    if max_worker_memory_gb:
        train["max_worker_memory_gb"] = max_worker_memory_gb
    if gpu:
        train["use_gpu"] = True
    if train:
        out["train"] = train
    return out or None


def distill_overrides(search: str | None = None, num_samples: int | None = None) -> dict | None:
    """`distill:` config overrides from the sweep flags of `raysys distill` and the distill_sweep job."""
    over = {k: v for k, v in (("search", search), ("num_samples", num_samples)) if v is not None}
    return {"distill": over} if over else None
