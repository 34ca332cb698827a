"""The FastAPI + uvicorn peer (bench.peer_apps serves it): uvicorn's factory, imported in each worker,
its settings in the environment. A module of its own because FastAPI resolves the endpoint's
annotations (Request) from the module's globals."""

from __future__ import annotations

import os

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool

from bench.inprocess import Pipeline
from bench.peer_apps import ROUTE


def app() -> FastAPI:
    chain = Pipeline.for_peer(os.environ["PEER_EXPORT"], int(os.environ["PEER_THREADS"]))
    service = FastAPI()

    @service.post(ROUTE)
    async def predict(model: str, request: Request) -> list[dict]:
        body = await request.body()
        return (await run_in_threadpool(chain.rows, [body]))[0]

    return service
