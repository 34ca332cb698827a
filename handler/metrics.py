"""The handler's Prometheus metrics, by the names a scrape shows (declared for TorchServe in
handler/metrics.yaml; bench/stages.py and the tests read them by these names).

Prometheus's conventions (`promtool check metrics`): snake_case, base units (seconds), counters end
in `_total`. TorchServe adds the labels `ModelName` and `Level` to every model metric and names its
own metrics itself (docs/serving.md, "Metrics", lists what remains of promtool's warnings and why).
"""

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes

# Histograms, one observation per batch (TorchServe 0.12 gives every histogram Prometheus's default
# buckets, 0.005-10: seconds suit them)
STAGE_SECONDS_HISTOGRAM = {"preprocess": "car_preprocess_seconds", "inference": "car_inference_seconds"}
# one observation per photo answered with a car: its calibrated top-1 probability, 0-1 (the default
# buckets up to 1 apply)
TOP1_PROBABILITY = "car_top1_probability"
# one observation per photo answered (models with a car detector): how many cars were found in it
CARS_PER_IMAGE = "car_cars_per_image"

# Counters: running totals per stage (label `stage`), from which rates give the seconds per image and
# the batch size of each stage; predictions by top-1 class (`class_name`); refused photos by HTTP `status`;
STAGE_SECONDS = "car_stage_seconds_total"
STAGE_IMAGES = "car_stage_images_total"
STAGE_BATCHES = "car_stage_batches_total"
PREDICTIONS = "car_predictions_total"
INPUT_ERRORS = "car_input_errors_total"
# answers that found no car in the photo, and answers marked uncertain (a car, but not sure which)
NO_CAR = "car_no_car_total"
UNCERTAIN = "car_uncertain_total"


def add_stage_time(metrics, stage: str, seconds: float, images: int) -> None:
    """A histogram of the batch's seconds, plus running totals (counters) from which a scraper such as
    bench/stages.py derives the time per image and the batch size of each stage."""
    dims = [Dimension("stage", stage)]
    metrics.add_time(STAGE_SECONDS_HISTOGRAM[stage], seconds, None, "s", [], MetricTypes.HISTOGRAM)
    metrics.add_counter(STAGE_SECONDS, seconds, None, dims)
    metrics.add_counter(STAGE_IMAGES, images, None, dims)
    metrics.add_counter(STAGE_BATCHES, 1, None, dims)


def add_refusal(metrics, status: int) -> None:
    metrics.add_counter(INPUT_ERRORS, 1, None, [Dimension("status", str(status))])


def add_answer(metrics, answer) -> None:
    """One answer (carmodel.predictor.Answer): no car, or its top-1 class and probability, and whether
    unsure; and how many cars were found."""
    if answer.cars is not None:
        metrics.add_metric(CARS_PER_IMAGE, len(answer.cars), "count", None, [], MetricTypes.HISTOGRAM)
    if not answer.car_found:
        metrics.add_counter(NO_CAR, 1, None, [])
        return
    top1 = answer.predictions[0]
    metrics.add_counter(PREDICTIONS, 1, None, [Dimension("class_name", top1.class_name)])
    metrics.add_metric(TOP1_PROBABILITY, top1.probability, "probability", None, [], MetricTypes.HISTOGRAM)
    if answer.uncertain:
        metrics.add_counter(UNCERTAIN, 1, None, [])
