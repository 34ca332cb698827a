"""One image's answer as one line of predict-dir's results, whichever engine answered it: the
server's detailed answer over HTTP, or the Ray engine's own chain (carmodel.predictor.Answer.details)."""

from __future__ import annotations

ROW_FIELDS = ("class_id", "class_name", "probability", "make", "model", "year", "body_type")


def from_details(answer: dict) -> dict:
    """The handler's detailed answer (carmodel.predictor.Answer.details) as one result line's fields:
    the most prominent car's, and with a car detector every car found (`cars`, that one first)."""
    cars = {"cars": [car_fields(car) for car in answer["cars"]]} if "cars" in answer else {}
    if not answer["car"]["found"]:
        return {"car_found": False, "car_score": answer["car"]["score"], "top_k": [], **cars}
    best = answer["predictions"][0]
    return {
        "car_found": True,
        "car_score": answer["car"]["score"],
        **{key: best[key] for key in ROW_FIELDS},
        "make_probability": answer["make"]["probability"] if answer["make"] else None,
        "uncertain": answer["uncertain"],
        "top_k": answer["predictions"],
        **cars,
    }


def car_fields(car: dict) -> dict:
    """One car of the detailed answer's `cars`: its box and score, and its top-1 with the make."""
    best = car["predictions"][0]
    return {
        "box": car["box"],
        "score": car["score"],
        **{key: best[key] for key in ROW_FIELDS},
        "make_probability": car["make"]["probability"] if car["make"] else None,
        "uncertain": car["uncertain"],
    }


def from_error(message: str, status: int | None) -> dict:
    """A refused or unreadable image's line."""
    return {"error": message, "status": status}
