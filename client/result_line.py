"""One image's answer as one line of predict-dir's results, whichever engine answered it: the
server's detailed answer over HTTP, or the Ray engine's own chain (carmodel.predictor.Answer.details)."""

from __future__ import annotations

ROW_FIELDS = ("class_id", "class_name", "probability", "make", "model", "year", "body_type")


def from_details(answer: dict) -> dict:
    """The handler's detailed answer (carmodel.predictor.Answer.details) as one result line's fields."""
    if not answer["car"]["found"]:
        return {"car_found": False, "car_score": answer["car"]["score"], "top_k": []}
    best = answer["predictions"][0]
    return {
        "car_found": True,
        "car_score": answer["car"]["score"],
        **{key: best[key] for key in ROW_FIELDS},
        "make_probability": answer["make"]["probability"] if answer["make"] else None,
        "uncertain": answer["uncertain"],
        "top_k": answer["predictions"],
    }


def from_error(message: str, status: int | None) -> dict:
    """A refused or unreadable image's line."""
    return {"error": message, "status": status}
