"""The car classifier's own code: configuration, preprocessing, architectures, the export folder,
the runners and the predictor. No TorchServe, no CLI, and no import of anything else in this
repository: training/ and handler/ build on it, serving/ on handler/, client/ and bench/ on those.

Kept import-free, so `import carmodel.images` does not pull in torch.
"""
