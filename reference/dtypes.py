"""Floating-point formats, stated once: every part of gpt-parity reads its dtype facts here
(pure Python: the reference stays free of torch).

`unit_roundoff` u = 2^-(mantissa + 1) is the largest relative error of round-to-nearest (a
generic value moves by a relative error uniform in +-u, variance u^2/3); `eps` = 2u is the gap
between 1 and the next value.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    name: str
    mantissa: int   # stored mantissa bits
    min_exp: int    # exponent of the smallest normal value
    max: float      # largest finite value

    @property
    def eps(self) -> float:
        return 2.0 ** -self.mantissa

    @property
    def unit_roundoff(self) -> float:
        return 2.0 ** -(self.mantissa + 1)


DTYPES = {
    "float64": DType(name="float64", mantissa=52, min_exp=-1022, max=1.7976931348623157e308),
    "float32": DType(name="float32", mantissa=23, min_exp=-126, max=3.4028234663852886e38),
    "float16": DType(name="float16", mantissa=10, min_exp=-14, max=65504.0),
    "bfloat16": DType(name="bfloat16", mantissa=7, min_exp=-126, max=float.fromhex("0x1.fep127")),
}
# every spelling a user or a config may use for them
ALIASES = {"fp64": "float64", "double": "float64", "fp32": "float32", "float": "float32",
           "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def canonical(name: str) -> str:
    """'fp16' -> 'float16'; names that are not aliases come back unchanged."""
    return ALIASES.get(name, name)


def facts(name: str) -> DType:
    """The facts of a dtype by any of its names (KeyError for an unknown one)."""
    return DTYPES[canonical(name)]
