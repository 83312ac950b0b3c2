"""The one error type the algorithm raises for bad input."""


class NestedDiffusionError(ValueError):
    """Bad input to nested sampling; the message names the input and the allowed values."""
