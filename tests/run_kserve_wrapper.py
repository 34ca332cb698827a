"""Run TorchServe's KServe wrapper (the process KServe's TorchServe runtime image runs in front of
TorchServe) as it is, with kserve 0.13.0 from .venv-kserve, for tests/test_kserve.py:

    .venv-kserve/bin/python tests/run_kserve_wrapper.py WRAPPER_DIR STUBS_DIR HTTP_PORT GRPC_PORT

Its environment is the runtime's (CONFIG_PATH, PROTOCOL_VERSION, MODEL_LOAD_DELAY). The one change:
the wrapper hard-codes its ports (8080 HTTP, 8081 gRPC) in its __main__, and a test must not take
the machine's 8080, so ModelServer gets the free ports given here instead. STUBS_DIR holds the
inference_pb2*.py the runtime image compiles from TorchServe's protos at build time.
"""

import runpy
import sys
from pathlib import Path

import kserve.model_server

wrapper, stubs, http_port, grpc_port = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
original_init = kserve.model_server.ModelServer.__init__


def on_free_ports(self, *args, **kwargs):
    original_init(self, *args, **{**kwargs, "http_port": http_port, "grpc_port": grpc_port})


kserve.model_server.ModelServer.__init__ = on_free_ports
sys.path[:0] = [str(wrapper), stubs]  # the wrapper imports its modules and the stubs by bare name
sys.argv = [str(wrapper / "__main__.py")]
runpy.run_path(str(wrapper / "__main__.py"), run_name="__main__")
