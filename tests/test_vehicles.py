"""carmodel/vehicles.py against the 196 official class names of the devkit (cars_meta.mat)."""

from __future__ import annotations

import pytest
from helpers import SHARED_CARS

from carmodel.vehicles import BODY_TYPES, MULTI_WORD_MAKES, TRIM_BODY_TYPES, describe, groups
from training.data import read_devkit_class_names


@pytest.fixture(scope="module")
def names() -> list[str]:
    names = read_devkit_class_names(SHARED_CARS) if (SHARED_CARS / "devkit").is_dir() else None
    if names is None:
        pytest.skip(f"the devkit's cars_meta.mat not found under {SHARED_CARS}")
    return names


def test_every_official_name_is_make_model_body_year(names):
    assert len(names) == 196
    for name in names:
        vehicle = describe(name)
        assert vehicle.body_type in BODY_TYPES, name
        assert 1990 <= vehicle.year <= 2012, name
        # nothing is lost: the name is the make, the model, the body type word (when it is one) and the year
        words = [vehicle.make, vehicle.model]
        if name.removesuffix(f" {vehicle.year}").endswith(f" {vehicle.body_type}"):
            words.append(vehicle.body_type)
        assert " ".join([*words, str(vehicle.year)]) == name


def test_makes_are_the_49_of_the_dataset(names):
    makes, _ = groups(names, "make")
    assert len(makes) == 49
    assert set(MULTI_WORD_MAKES) <= set(makes)
    assert {"Mercedes-Benz", "Rolls-Royce", "smart", "HUMMER", "FIAT"} <= set(makes)
    assert not {"Aston", "Land", "AM"} & set(makes)


def test_every_exception_names_a_real_class(names):
    assert set(TRIM_BODY_TYPES) <= set(names)


@pytest.mark.parametrize(
    ("name", "make", "model", "body_type"),
    [
        ("AM General Hummer SUV 2000", "AM General", "Hummer", "SUV"),
        ("Aston Martin V8 Vantage Convertible 2012", "Aston Martin", "V8 Vantage", "Convertible"),
        ("Land Rover Range Rover SUV 2012", "Land Rover", "Range Rover", "SUV"),
        ("Acura Integra Type R 2001", "Acura", "Integra Type R", "Coupe"),  # a trim, not a body
        ("Dodge Charger SRT-8 2009", "Dodge", "Charger SRT-8", "Sedan"),
        ("Chevrolet Corvette Ron Fellows Edition Z06 2007", "Chevrolet", "Corvette Ron Fellows Edition Z06", "Coupe"),
        ("Lamborghini Gallardo LP 570-4 Superleggera 2012", "Lamborghini", "Gallardo LP 570-4 Superleggera", "Coupe"),
        ("Chevrolet Silverado 1500 Extended Cab 2012", "Chevrolet", "Silverado 1500 Extended Cab", "Pickup"),  # a cab
        ("Ford Ranger SuperCab 2011", "Ford", "Ranger SuperCab", "Pickup"),
        ("Ram C/V Cargo Van Minivan 2012", "Ram", "C/V Cargo Van", "Minivan"),  # the last body word counts
        ("Rolls-Royce Phantom Drophead Coupe Convertible 2012", "Rolls-Royce", "Phantom Drophead Coupe", "Convertible"),
        ("Infiniti G Coupe IPL 2012", "Infiniti", "G Coupe IPL", "Coupe"),
    ],
)
def test_the_exceptions_are_read_as_written(name, make, model, body_type):
    vehicle = describe(name)
    assert (vehicle.make, vehicle.model, vehicle.body_type) == (make, model, body_type)


@pytest.mark.parametrize("name", ["Ford Mustang", "Ford Mustang Convertible", "Ford Mustang GT 2007", "2012"])
def test_a_name_that_fits_no_rule_says_so(name):
    with pytest.raises(ValueError, match="year|body type"):
        describe(name)
