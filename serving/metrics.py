"""The handler's Prometheus metrics, by the names a scrape shows (declared for TorchServe in
config/metrics.yaml; bench/stages.py and the tests read them by these names).

Prometheus's conventions (`promtool check metrics`): snake_case, base units (seconds), counters end
in `_total`. TorchServe adds the labels `ModelName` and `Level` to every model metric and names its
own metrics itself (README, "Metrics", lists what remains of promtool's warnings and why).
"""

# Histograms, one observation per batch (TorchServe 0.12 gives every histogram Prometheus's default
# buckets, 0.005-10: seconds suit them)
STAGE_SECONDS_HISTOGRAM = {"preprocess": "car_preprocess_seconds", "inference": "car_inference_seconds"}
# one observation per answered photo: its top-1 probability, 0-1 (the default buckets up to 1 apply)
TOP1_PROBABILITY = "car_top1_probability"

# Counters: running totals per stage (label `stage`), from which rates give the seconds per image and
# the batch size of each stage; predictions by top-1 class (`class_name`); refused photos by HTTP `status`.
STAGE_SECONDS = "car_stage_seconds_total"
STAGE_IMAGES = "car_stage_images_total"
STAGE_BATCHES = "car_stage_batches_total"
PREDICTIONS = "car_predictions_total"
INPUT_ERRORS = "car_input_errors_total"
