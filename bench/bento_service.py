"""The BentoML peer (bench/peer_apps.py): the export's chain behind a batchable BentoML API that takes
the photo as a multipart file. Its settings come in the environment: BentoML imports this module in
each of its processes."""

from __future__ import annotations

import os
from pathlib import Path

import bentoml

from bench.inprocess import Pipeline
from bench.peer_apps import ROUTE
from carmodel.paths import DEFAULT_MODEL


@bentoml.service(workers=int(os.environ.get("PEER_WORKERS", "1")), traffic={"timeout": 60})
class Cars:
    def __init__(self):
        self.chain = Pipeline.for_peer(os.environ["PEER_EXPORT"], int(os.environ.get("PEER_THREADS", "0")))

    @bentoml.api(
        batchable=True,
        max_batch_size=int(os.environ.get("PEER_BATCH", "8")),
        max_latency_ms=60_000,
        route=ROUTE.format(model=os.environ.get("PEER_MODEL", DEFAULT_MODEL)),
    )
    def predict(self, photo: list[Path]) -> list[list[dict]]:
        return self.chain.rows([path.read_bytes() for path in photo])
