"""What a QuantizeLinear's range says about it: whether it only rounds, or also clips at zero.

QuantizeLinear maps x to clip(round(x/s) + z, qmin, qmax) for its integer type. A zero point at
either end of the range (z = qmin, as in uint8 with z = 0, the default when z is absent) makes it
clip every value on one side of zero: quantize_static writes a Relu (or a Clip at 0) that way,
fused into the quantizer. Removing such a quantizer removes the activation, not just a rounding.
"""

from __future__ import annotations

import numpy as np

INTEGER_RANGES = {np.dtype(t): (np.iinfo(t).min, np.iinfo(t).max) for t in (np.int8, np.uint8, np.int16, np.uint16)}


def clips_at_zero(zero_point: np.ndarray | None) -> bool:
    """Whether a quantizer with this zero point (None: absent, so uint8 0) clips at zero."""
    if zero_point is None:
        return True
    limits = INTEGER_RANGES.get(np.asarray(zero_point).dtype)
    if limits is None:
        return False  # int32, int4, float8: not a fused activation's form
    values = np.asarray(zero_point)
    return bool(np.any((values == limits[0]) | (values == limits[1])))
