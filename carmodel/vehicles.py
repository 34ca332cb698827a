"""Make, model, year and body type of every class, read off its official Stanford Cars name.

A name is "<make> <model> [<body type>] <year>": "Audi S5 Coupe 2012", "Land Rover LR2 SUV 2012".
The rules are plain; their exceptions are written out here, in one place:

* makes of more than one word (`MULTI_WORD_MAKES`);
* pickups, named by their cab ("Crew Cab", "SuperCab"): body type Pickup, the cab stays in the model;
* names that end in a trim or edition rather than a body ("Type R", "SRT-8", "Z06", "Superleggera",
  "IPL"): their body type is written out in `TRIM_BODY_TYPES`.

The answer sums class probabilities over a make and over a body type (carmodel.predictor), so a
person gets "a BMW, 97 %" even when the model hesitates between two BMWs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MULTI_WORD_MAKES = ("AM General", "Aston Martin", "Land Rover")
BODY_TYPES = ("Convertible", "Coupe", "Hatchback", "Minivan", "Pickup", "SUV", "Sedan", "Van", "Wagon")
PICKUP = "Pickup"
# A pickup's name gives its cab, not its body.
CAB_STYLE = re.compile(r"(Regular|Extended|Club|Crew|Quad) Cab$|SuperCab$")
# Names whose last word before the year is a trim, with the body type of the cars of that class.
TRIM_BODY_TYPES = {
    "Acura Integra Type R 2001": "Coupe",
    "Acura TL Type-S 2008": "Sedan",
    "Buick Regal GS 2012": "Sedan",
    "Chevrolet Cobalt SS 2010": "Coupe",
    "Chevrolet Corvette Ron Fellows Edition Z06 2007": "Coupe",
    "Chevrolet Corvette ZR1 2012": "Coupe",
    "Chevrolet HHR SS 2010": "Wagon",
    "Chevrolet TrailBlazer SS 2009": "SUV",
    "Chrysler 300 SRT-8 2010": "Sedan",
    "Dodge Challenger SRT8 2011": "Coupe",
    "Dodge Charger SRT-8 2009": "Sedan",
    "FIAT 500 Abarth 2012": "Hatchback",
    "Infiniti G Coupe IPL 2012": "Coupe",
    "Jaguar XK XKR 2012": "Coupe",
    "Lamborghini Gallardo LP 570-4 Superleggera 2012": "Coupe",
}


@dataclass(frozen=True)
class Vehicle:
    make: str
    model: str  # everything between the make and the year, the body type word left out
    year: int
    body_type: str

    def to_dict(self) -> dict:
        return {"make": self.make, "model": self.model, "year": self.year, "body_type": self.body_type}


def describe(name: str) -> Vehicle:
    """The class `name` as make, model, year and body type; ValueError for a name that fits no rule."""
    words, _, year = name.rpartition(" ")
    if not year.isdigit() or len(year) != 4:
        raise ValueError(f"{name!r}: a class name ends in its model year")
    make = next((m for m in MULTI_WORD_MAKES if words.startswith(m + " ")), words.split(" ", 1)[0])
    model = words[len(make) + 1 :]
    last = model.rsplit(" ", 1)[-1]
    if name in TRIM_BODY_TYPES:
        body = TRIM_BODY_TYPES[name]
    elif CAB_STYLE.search(model):
        body = PICKUP
    elif last in BODY_TYPES and " " in model:
        body, model = last, model.rsplit(" ", 1)[0]
    else:
        raise ValueError(f"{name!r}: no body type, cab or known trim before the year")
    return Vehicle(make, model, int(year), body)


def groups(classes: list[str], attribute: str) -> tuple[list[str], list[int]]:
    """The distinct values of `attribute` ("make" or "body_type") over `classes`, in first-seen order,
    and the index of each class's value among them."""
    values = [getattr(describe(name), attribute) for name in classes]
    names = list(dict.fromkeys(values))
    return names, [names.index(value) for value in values]
