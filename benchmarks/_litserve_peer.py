"""A peer of benchmarks/serve_load.py: the student behind LitServe (Lightning AI's serving engine, which its README
says is 2x FastAPI), batched, with as many inference workers as the endpoint has replicas. Each request is
validated with the same code as the endpoint (`serve.parsing.validate_request`, 422 naming the field), the
batch scored with one forward pass of the same `Scorer`, one torch thread per worker.

    RAYSYS_BENCH_REGISTRY=... RAYSYS_BENCH_MODEL=... python benchmarks/_litserve_peer.py --port 8002 --workers 2
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import litserve as ls  # noqa: E402


class StudentAPI(ls.LitAPI):
    def setup(self, device):
        import torch

        from raysys.registry import Registry
        from serve.scoring import Scorer

        torch.set_num_threads(1)
        self.scorer = Scorer.from_loaded(Registry(os.environ["RAYSYS_BENCH_REGISTRY"]).load(
            os.environ["RAYSYS_BENCH_MODEL"], "production"))

    def decode_request(self, request):
        from fastapi import HTTPException

        from serve.parsing import RequestError, validate_request

        try:
            return validate_request(request, self.scorer.schema, self.scorer.preprocessor, max_instances=1024)
        except RequestError as e:
            raise HTTPException(status_code=e.status, detail=e.body()["detail"]) from None

    def batch(self, inputs):
        import numpy as np

        return (np.concatenate([r.x_num for r in inputs]), np.concatenate([r.x_cat for r in inputs]),
                [len(r.x_num) for r in inputs], [r.request_id for r in inputs])

    def predict(self, x):
        import numpy as np

        x_num, x_cat, sizes, ids = x
        proba = self.scorer.predict_proba(x_num, x_cat)
        return list(zip(np.split(proba, np.cumsum(sizes)[:-1]), ids))

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        import secrets

        from serve.scoring import format_prediction

        proba, request_id = output
        return {**format_prediction(self.scorer, proba), "request_id": request_id or secrets.token_hex(16)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=2, help="inference workers (the endpoint's replicas)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--batch-timeout", type=float, default=0.005)
    a = p.parse_args()
    api = StudentAPI(max_batch_size=a.max_batch_size, batch_timeout=a.batch_timeout, api_path="/v1/predict")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=a.workers, timeout=30)
    server.run(host="127.0.0.1", port=a.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
