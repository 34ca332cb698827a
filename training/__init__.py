"""Stanford Cars training pipeline: data -> model -> train -> tune -> evaluate -> export.

Kept import-free on purpose: the TorchServe handler imports `training.presets` and
`training.model` from inside the .mar, and must not pull in Ray, matplotlib or scikit-learn.
"""
