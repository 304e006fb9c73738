"""reasondiff: localize what reasoning training changed in a model, as pytest tests.

Importing this package is cheap on purpose (a pytest plugin is imported on every
run): torch and transformers are imported inside the functions that need them.
"""

__version__ = "0.1.0"
