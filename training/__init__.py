"""Stanford Cars training pipeline: data -> model -> train -> tune -> evaluate -> export.

Built on carmodel (the model's own code); nothing in carmodel, serving or client imports it.
"""
