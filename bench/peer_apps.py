"""The servers a user would pick instead of TorchServe, each serving the same export through the same
chain (bench.inprocess.Pipeline: the handler's own served chain, the plain top-k answer),
in the way its own documentation shows:

    fastapi   FastAPI + uvicorn, one request at a time per worker (the original project's shape)
    litserve  LitServe: a LitAPI with LitServe's dynamic batching, photos as base64 JSON (its image idiom)
    rayserve  Ray Serve: a deployment with @serve.batch, behind Serve's HTTP proxy
    bentoml   BentoML: a @bentoml.service whose batchable API takes the photo as a multipart file

Each answers POST /predictions/<model>. Started by bench.peers, one at a time:

    python -m bench.peer_apps fastapi --export models/efficientnet_lite0_cars --port 8600 --workers 2
"""

from __future__ import annotations

import argparse
import os
import sys

from carmodel.paths import DEFAULT_MODEL

PEERS = ("fastapi", "litserve", "rayserve", "bentoml")
ROUTE = "/predictions/{model}"


# ----------------------------------------------------------------------------- FastAPI + uvicorn


def serve_fastapi(args) -> None:
    import uvicorn

    os.environ.update(PEER_EXPORT=args.export, PEER_THREADS=str(args.threads))
    uvicorn.run(
        "bench.fastapi_service:app",  # its own module: FastAPI reads the endpoint's annotations from its globals
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
    )


# ----------------------------------------------------------------------------- LitServe


def serve_litserve(args) -> None:
    """LitServe pickles the LitAPI into its worker processes: it lives in its own module (bench/lit_service.py)."""
    import litserve as ls

    from bench.lit_service import CarsAPI

    os.environ.update(PEER_EXPORT=args.export, PEER_THREADS=str(args.threads))
    api = CarsAPI(
        max_batch_size=args.batch_size,
        batch_timeout=args.batch_delay_ms / 1000,
        api_path=ROUTE.format(model=args.model),
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers, timeout=60)
    server.run(host=args.host, port=args.port, log_level="warning", generate_client_file=False)


# ----------------------------------------------------------------------------- Ray Serve


def serve_rayserve(args) -> None:
    import ray
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(num_replicas=args.workers, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    class Cars:
        def __init__(self):
            from bench.inprocess import Pipeline

            self.chain = Pipeline.for_peer(args.export, args.threads)

        @serve.batch(max_batch_size=args.batch_size, batch_wait_timeout_s=args.batch_delay_ms / 1000)
        async def answer(self, bodies: list[bytes]) -> list[list[dict]]:
            return self.chain.rows(bodies)

        async def __call__(self, request: Request) -> list[dict]:
            return await self.answer(await request.body())

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(Cars.bind(), route_prefix=ROUTE.format(model=args.model), blocking=True)


# ----------------------------------------------------------------------------- BentoML


def serve_bentoml(args) -> None:
    """`bentoml serve` of bench/bento_service.py, its settings in the environment (BentoML imports the
    service module in each of its processes)."""
    os.environ.update(
        PEER_EXPORT=args.export,
        PEER_THREADS=str(args.threads),
        PEER_MODEL=args.model,
        PEER_BATCH=str(args.batch_size),
        PEER_DELAY_MS=str(args.batch_delay_ms),
        PEER_WORKERS=str(args.workers),
    )
    command = [sys.executable, "-m", "bentoml", "serve", "bench.bento_service:Cars"]
    os.execv(sys.executable, [*command, "--host", args.host, "--port", str(args.port)])


SERVE = {"fastapi": serve_fastapi, "litserve": serve_litserve, "rayserve": serve_rayserve, "bentoml": serve_bentoml}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peer", choices=PEERS)
    parser.add_argument("--export", required=True)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the name in the route")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1, help="worker processes, replicas or workers per device")
    parser.add_argument("--threads", type=int, default=0, help="threads per worker's chain (0 = all cores)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--batch_delay_ms", type=float, default=5)
    args = parser.parse_args(argv)
    SERVE[args.peer](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
