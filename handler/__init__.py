"""What runs inside TorchServe's Python worker, and nothing else: the archive packs this package with
carmodel/ and the export (serving/archive.py).

    car_handler.py  the handler TorchServe loads (BaseHandler, its four steps overridden)
    chain.py        the served chain: uploads -> decoding budget -> decode -> Predictor -> answers
    inputs.py       a TorchServe request row -> image bytes and options, or a 4xx
    settings.py     the served model's settings (model-config.yaml: workers, batching, the handler's)
    metrics.py      the handler's Prometheus metrics (declared for TorchServe in metrics.yaml)
    grpc_calls.py   TorchServe's gRPC front end, worked around
    oip.py          the Open Inference Protocol (KServe v2) envelope

Everything that runs around the server (starting it, the `serve` command, building archives, the
KServe layout, the HTTP client) is in serving/.
"""
