"""TorchServe 0.12's gRPC front end, worked around in one place.

A gRPC call reaches the handler like an HTTP request without HTTP headers. Two things differ:
the front end keeps only a batch's status, not each request's, and its StreamPredictions fails the
worker on an answer that does not say it is the last part of its stream.
"""

from __future__ import annotations

from ts.utils.util import PredictionException

from handler.inputs import has_request, http_headers, request_headers

STREAM_NEXT_HEADER = "ts_stream_next"  # TorchServe's: "true" while a streamed answer has more parts
# HTTP statuses the gRPC front end would map to FAILED_PRECONDITION: a bad image is an invalid argument
BATCH_STATUS = {415: 400, 422: 400}


def is_grpc(context, idx: int) -> bool:
    return has_request(context, idx) and not http_headers(request_headers(context, idx))


def finish(context, responses: list, is_error) -> None:
    """Mark every gRPC answer whole, and fail a gRPC request refused alone in its batch.

    Over HTTP the stream header would turn the answer into a chunked stream, so only gRPC gets it.
    A lone refusal fails its batch of one, which the front end turns into a non-OK status (4xx:
    INVALID_ARGUMENT, 413: RESOURCE_EXHAUSTED, 503: UNAVAILABLE) instead of an OK with our JSON error
    inside; in a larger batch that would cost the neighbours their answers, so they stay OK.
    """
    for idx in range(len(responses)):
        if is_grpc(context, idx):
            context.set_response_header(idx, STREAM_NEXT_HEADER, "false")
    if len(responses) == 1 and is_error(responses[0]) and is_grpc(context, 0):
        code = responses[0]["code"]
        raise PredictionException(responses[0]["message"], BATCH_STATUS.get(code, code))
