"""Seeded mutations of model files, the way broken downloads and hostile uploads look."""

from __future__ import annotations

import numpy as np


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One of: flipped bits, a truncation, inserted or deleted bytes, or two chunks swapped."""
    buf = bytearray(data)
    kind = rng.integers(5)
    if kind == 0:  # flip 1 to 8 bits
        for _ in range(rng.integers(1, 9)):
            i = int(rng.integers(len(buf)))
            buf[i] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # truncate
        buf = buf[: int(rng.integers(len(buf)))]
    elif kind == 2:  # insert random bytes
        i = int(rng.integers(len(buf)))
        buf[i:i] = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
    elif kind == 3:  # delete a run
        i = int(rng.integers(len(buf)))
        del buf[i : i + int(rng.integers(1, 16))]
    else:  # swap two chunks: fields of one message landing in another
        n = int(rng.integers(2, 32))
        i, j = sorted(int(x) for x in rng.integers(0, max(1, len(buf) - n), 2))
        buf[i : i + n], buf[j : j + n] = buf[j : j + n], buf[i : i + n]
    return bytes(buf)
