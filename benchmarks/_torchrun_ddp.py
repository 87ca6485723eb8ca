"""Plain-torch peer of raysys teacher training, for benchmarks/train_scaling.py (run under `torchrun`).

The same job as `raysys.train.loop` without Ray: the same Parquet training split held in memory, a
contiguous equal share of rows per rank, a shuffled per-rank order each epoch, the same
`Preprocessor.transform_batch` per batch, the same model, AdamW and `train_step`, DDP over gloo with one
intra-op thread. samples/s of an epoch = global rows / the slowest rank's training-loop time (the loop's
own definition). Rank 0 writes {"samples_per_s": [per epoch]} as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--spec", required=True, help="model spec JSON")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=256, help="global batch")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import numpy as np
    import torch
    import torch.distributed as dist

    from raysys.data import Preprocessor, read_split
    from raysys.data.schema import DatasetSchema
    from raysys.models import build_model
    from raysys.parallel import apply_ddp
    from raysys.train.loop import to_tensors, train_step

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    schema = DatasetSchema.model_validate_json((Path(args.root) / "schema.json").read_text())
    pre = Preprocessor.fit_split(schema, args.root)
    table = read_split(args.root, "train")
    n = (table.num_rows // world) * world  # equal shares, as Ray Data's streaming_split(equal=True)
    share = n // world
    cols = {c: table.column(c).to_numpy(zero_copy_only=False)[rank * share:(rank + 1) * share]
            for c in table.column_names}
    local_batch = args.batch_size // world
    torch.manual_seed(0)
    model = apply_ddp(build_model(json.loads(args.spec)))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    rates = []
    for epoch in range(args.epochs):
        order = np.random.default_rng(epoch * 100 + rank).permutation(share)
        dist.barrier()
        t0 = time.perf_counter()
        rows = 0
        for i in range(0, share, local_batch):
            idx = order[i:i + local_batch]
            batch = {c: v[idx] for c, v in cols.items()}
            x_num, x_cat, y = to_tensors(*pre.transform_batch(batch))
            train_step(model, opt, x_num, x_cat, y)
            rows += len(y)
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        total = torch.tensor([rows], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        dist.all_reduce(total)
        rates.append(float(total) / float(dt))
    if rank == 0:
        Path(args.out).write_text(json.dumps({"samples_per_s": rates, "world": world,
                                              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}))
    dist.destroy_process_group()
    # exit here, before `model` is freed: freeing DDP's Reducer at interpreter teardown can deadlock (the main
    # thread joins gloo's worker thread while holding the GIL that thread needs to release a tensor; seen
    # once, py-spy: ~ProcessGroupGloo <- ~Reducer), which leaves torchrun waiting forever
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
