"""The one error type of the project, and the one way a command ends on one.

`StatusError`: a refusal that carries the HTTP status it is answered with and the exit status a
command line ends with. A bad upload (carmodel.images.InputError), a malformed KServe v2 request
(handler.oip.ProtocolError), TorchServe's own refusal seen by a client (serving.client.TorchServeError),
a client's local failure and the demo page's answers all are one; every server of the project answers
with `to_json()`. Where no HTTP answer exists (a client that could not connect), the status is None.

Exit statuses of every command:

    0  done
    1  done, but some inputs failed (predict-dir)
    2  EXIT_USAGE        a usage problem or bad local input
    3  EXIT_UNREACHABLE  TorchServe not reachable, or it refused the token
    4  EXIT_SERVER       TorchServe answered with an error, or no answer in time
"""

from __future__ import annotations

import sys

EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_SERVER = 4


class StatusError(Exception):
    """`status`: the HTTP status; `message`: what went wrong, in words meant for the sender;
    `exit_code`: what a command line exits with when this error ends it."""

    def __init__(self, status: int | None, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.status = status
        self.message = message
        self.exit_code = exit_code

    def to_json(self) -> dict:
        """The JSON error body every server of the project answers with."""
        return {"code": self.status, "type": type(self).__name__, "message": self.message}


def exit_with(err: Exception | str) -> int:
    """A command's end on an error: `error: <message>` on stderr; returns its exit status (the
    error's own `exit_code`, else EXIT_USAGE)."""
    print(f"error: {err}", file=sys.stderr)
    return getattr(err, "exit_code", EXIT_USAGE)
