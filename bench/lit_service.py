"""The LitServe peer's LitAPI (bench.peer_apps serves it): at module level, because LitServe pickles it
into its worker processes. Its settings come in the environment, as the other peers' do."""

from __future__ import annotations

import base64
import os

import litserve as ls

from bench.peer_apps import pipeline, rows


class CarsAPI(ls.LitAPI):
    def setup(self, device):
        self.chain = pipeline(os.environ["PEER_EXPORT"], int(os.environ["PEER_THREADS"]))

    def decode_request(self, request):
        return base64.b64decode(request["image"])

    def predict(self, bodies):
        return rows(self.chain, list(bodies)) if isinstance(bodies, list) else rows(self.chain, [bodies])[0]

    def encode_response(self, output):
        return output
