"""The peer of benchmarks/serve_load.py: what a user would write instead of Ray Serve. One uvicorn process,
one FastAPI route, each request validated and scored on its own (no batching) with the same student, the
same validation code and one torch thread, like a replica.

    RAYSYS_BENCH_REGISTRY=... RAYSYS_BENCH_MODEL=... uvicorn _plain_fastapi:app --app-dir benchmarks --port 8001
"""

import json
import os
import secrets
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import Response  # noqa: E402

from raysys.registry import Registry  # noqa: E402
from serve.parsing import RequestError, validate_request  # noqa: E402
from serve.scoring import Scorer, format_prediction  # noqa: E402
from serve.web import error_response  # noqa: E402

torch.set_num_threads(1)
scorer = Scorer.from_loaded(Registry(os.environ["RAYSYS_BENCH_REGISTRY"]).load(os.environ["RAYSYS_BENCH_MODEL"],
                                                                               "production"))
app = FastAPI()


@app.post("/v1/predict")
async def predict(request: Request) -> Response:
    try:
        req = validate_request(await request.body(), scorer.schema, scorer.preprocessor, max_instances=1024)
    except RequestError as e:
        return error_response(e)
    out = format_prediction(scorer, scorer.predict_proba(req.x_num, req.x_cat))
    out["request_id"] = req.request_id or secrets.token_hex(16)  # as the endpoint makes one
    return Response(json.dumps(out, separators=(",", ":")), media_type="application/json")


@app.get("/healthz")
async def healthz() -> Response:
    return Response('{"status":"ok"}', media_type="application/json")
