"""`ShardCache`: a worker's shard of a split, streamed from Ray Data once and kept in memory when it fits, or
sliced from a whole in-memory table (`from_table`)."""

from __future__ import annotations

import numpy as np


class ShardCache:
    """This worker's shard of a split, streamed from Ray Data on the first pass and kept in memory after it
    when it fits in `max_bytes`: later epochs shuffle it in memory (a full permutation per epoch, seeded)
    instead of re-reading it through Ray Data. On small and medium data the per-epoch Ray Data iteration
    (split coordination, the local shuffle buffer) costs as much as the training steps; cached, the loop
    does what a plain torchrun loop does. Larger shards keep streaming (memory stays bounded).
    """

    def __init__(self, shard, max_bytes: float):
        self.shard = shard
        self.max_bytes = max_bytes
        self.cols: dict[str, np.ndarray] | None = None

    @classmethod
    def from_table(cls, table, rank: int, world: int) -> ShardCache:
        """Rank `rank`'s share of a whole split held as one Arrow table (raysys.train.trainer hands small splits
        to the workers this way, through the object store): the same number of rows for every rank, as Ray
        Data's `streaming_split(equal=True)` gives (the last `num_rows % world` rows go unused), contiguous rows
        `[rank * share, (rank + 1) * share)`; cached from the start, every epoch is a seeded permutation of it."""
        share = table.num_rows // world
        part = table.slice(rank * share, share)
        cache = cls(None, max_bytes=float("inf"))
        # the conversion Ray Data's numpy batches use (strings -> object arrays, a nullable number -> NaN)
        cache.cols = {c: part.column(c).to_numpy(zero_copy_only=False) for c in part.column_names}
        return cache

    @property
    def cached(self) -> bool:
        return self.cols is not None

    @staticmethod
    def _nbytes(batch: dict[str, np.ndarray]) -> int:
        # object arrays (string categories) hold pointers: count ~64 B per Python string
        return sum(v.nbytes if v.dtype != object else 64 * v.size for v in batch.values())

    def batches(self, batch_size: int, *, shuffle_seed: int | None = None):
        if self.cols is not None:
            yield from self._cached_batches(batch_size, shuffle_seed)
            return
        kwargs = ({} if shuffle_seed is None else
                  dict(local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=shuffle_seed))
        parts: list[dict[str, np.ndarray]] | None = [] if self.max_bytes > 0 else None
        size = 0
        for batch in self.shard.iter_batches(batch_size=batch_size, batch_format="numpy", **kwargs):
            if parts is not None:
                size += self._nbytes(batch)
                parts = parts + [batch] if size <= self.max_bytes else None
            yield batch
        if parts:
            self.cols = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}

    def load(self, field: str) -> int:
        """Read the whole shard into memory (a no-op once cached); returns its rows. ValueError naming `field`
        when it does not fit in `max_bytes`."""
        if self.cols is None:  # the whole pass: it fills the cache when the shard fits
            rows = sum(len(next(iter(b.values()))) for b in self.batches(4096))
        else:
            rows = len(next(iter(self.cols.values())))
        if not rows:
            raise ValueError(f"{field}: this worker's shard of the training split is empty; use fewer workers")
        if self.cols is None:
            raise ValueError(f"{field}: needs this worker's whole shard in memory, but it is over train.cache_shard_mb "
                             f"({self.max_bytes / 2**20:g} MB); raise train.cache_shard_mb or add workers")
        return rows

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The cached rows `idx` (after `load`)."""
        return {c: v[idx] for c, v in self.cols.items()}

    def _cached_batches(self, batch_size: int, shuffle_seed: int | None):
        n = len(next(iter(self.cols.values())))
        order = np.random.default_rng(shuffle_seed).permutation(n) if shuffle_seed is not None else None
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size] if order is not None else slice(i, i + batch_size)
            yield {c: v[idx] for c, v in self.cols.items()}
