"""The one error type the algorithm raises for bad input."""


class NestedDiffusionError(ValueError):
    """Bad input to nested sampling; the message names the input and the allowed values."""


def check_number(name: str, value: float, low: float, high: float) -> float:
    """Refuse NaN, infinities and values outside [low, high] (JSON NaN slips past ComfyUI's min/max checks)."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise NestedDiffusionError(f"{name} must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)
