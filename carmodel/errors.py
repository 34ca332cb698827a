"""The one error type of the project: a refusal that carries the HTTP status it is answered with.

A bad upload (carmodel.images.InputError), a malformed KServe v2 request (serving.oip), TorchServe's
own refusal seen by a client (serving.client.TorchServeError) and the demo page's answers all are
one: a status and a message a person can act on. Where no HTTP answer exists (a client that could
not connect), the status is None.
"""

from __future__ import annotations


class StatusError(Exception):
    """`status`: the HTTP status; `message`: what went wrong, in words meant for the sender."""

    def __init__(self, status: int | None, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def to_json(self) -> dict:
        """The JSON error body every server of the project answers with."""
        return {"code": self.status, "type": type(self).__name__, "message": self.message}
