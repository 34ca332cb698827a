"""The LitServe peer's LitAPI (bench.peer_apps serves it): at module level, because LitServe pickles it
into its worker processes. Its settings come in the environment, as the other peers' do."""

from __future__ import annotations

import base64
import os

import litserve as ls

from bench.inprocess import Pipeline


class CarsAPI(ls.LitAPI):
    def setup(self, device):
        self.chain = Pipeline.for_peer(os.environ["PEER_EXPORT"], int(os.environ["PEER_THREADS"]))

    def decode_request(self, request):
        return base64.b64decode(request["image"])

    def predict(self, bodies):
        return self.chain.rows(list(bodies)) if isinstance(bodies, list) else self.chain.rows([bodies])[0]

    def encode_response(self, output):
        return output
