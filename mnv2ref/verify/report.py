"""The result of `verify`: one row per endpoint, the first divergence, hints.

    report.format()     the table and a one-line verdict (the last line)
    report.to_dict()    the JSON form:
        {"model", "interface": {"layout", "color", "scale"}, "precision",
         "endpoints": [{"name", "foreign", "max_rel_err", "cosine"}, ...],
         "first_divergence": name | null, "hints": [...], "tolerance"}
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from ..golden import TOLERANCES as GOLDEN_TOLERANCES

# Default tolerances, relative to each endpoint's range. float32 conversions
# agree to float32 rounding (the goldens: at most 1.1e-5 on the real weights);
# a float16 or int8 model is not expected to, and is judged by what its
# precision can give.
TOLERANCES = {"float32": GOLDEN_TOLERANCES["float32"], "float16": 0.1, "int8": 0.25}
# A low-precision model's largest error sits on a few outliers (values near a
# quantization bound); a wrong computation also turns the tensor's direction.
# So there an endpoint diverges only when its cosine similarity drops too.
COSINE_FLOORS = {"float16": 0.999, "int8": 0.95}


def beyond(match: "EndpointMatch", tolerance: float, precision: str = "float32") -> bool:
    """Whether a matched endpoint is beyond tolerance: its max relative
    error exceeds `tolerance`, and for a float16/int8 model its cosine
    similarity is also below that precision's floor."""
    if match.foreign is None or match.max_rel_err <= tolerance:
        return False
    return precision not in COSINE_FLOORS or match.cosine < COSINE_FLOORS[precision]


@dataclass
class EndpointMatch:
    """One of our endpoints and the foreign tensor it was compared with."""

    name: str
    foreign: Optional[str]          # their tensor's name; None when nothing matched
    max_rel_err: Optional[float]    # compare.relative_error(theirs, ours)
    cosine: Optional[float]         # cosine similarity of the flattened tensors


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """<a, b> / (|a| |b|) of the flattened arrays, in float64 (1.0 for two zero arrays)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    if norms == 0:
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(a @ b / norms)


@dataclass
class VerifyReport:
    """What `mnv2ref.verify` found. `exit_code` is 0 when every matched
    endpoint is within `tolerance` (and the interface is the declared one),
    1 when the model diverges."""

    model: str
    interface: dict
    precision: str
    endpoints: list
    first_divergence: Optional[str]
    hints: list = field(default_factory=list)
    tolerance: float = TOLERANCES["float32"]
    notes: list = field(default_factory=list)   # what was detected, not a bug

    @property
    def passed(self) -> bool:
        return self.first_divergence is None and any(m.foreign for m in self.endpoints)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    @property
    def matched(self) -> list:
        return [m for m in self.endpoints if m.foreign is not None]

    def to_dict(self) -> dict:
        """The report as the documented JSON object (NaN/inf become null)."""
        def finite(value):
            return value if value is None or math.isfinite(value) else None

        return {
            "model": self.model,
            "interface": dict(self.interface),
            "precision": self.precision,
            "endpoints": [{**asdict(m), "max_rel_err": finite(m.max_rel_err), "cosine": finite(m.cosine)}
                          for m in self.endpoints],
            "first_divergence": self.first_divergence,
            "hints": list(self.hints),
            "tolerance": self.tolerance,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def write_json(self, path) -> None:
        """Write `to_json()` to `path` (atomically), or to stdout for "-"."""
        from ..files import write_json

        write_json(path, self.to_dict(), indent=2)
        if str(path) == "-":
            return
        print(f"mnv2ref: wrote {path}", file=sys.stderr)

    def format(self) -> str:
        """A table (endpoint, their tensor, error, cosine), the notes and
        hints, and a last line with the verdict."""
        width = max([len(m.name) for m in self.endpoints] + [8])
        rows = [f"model      {self.model}",
                f"interface  {self.interface['layout']}, {self.interface['color']}, {self.interface['scale']}",
                f"precision  {self.precision} (tolerance {self.tolerance:g} of each endpoint's range"
                + (f", or cosine similarity >= {COSINE_FLOORS[self.precision]:g})"
                   if self.precision in COSINE_FLOORS else ")"),
                "",
                f"{'endpoint':<{width}}  {'max rel err':>11}  {'cosine':>10}  their tensor"]
        unmatched = []  # a run of endpoints without a tensor is one line

        def flush():
            if len(unmatched) == 1:
                rows.append(f"{unmatched[0]:<{width}}  {'-':>11}  {'-':>10}  (no matching tensor)")
            elif unmatched:
                rows.append(f"{'...':<{width}}  {'-':>11}  {'-':>10}  (no matching tensor for the "
                            f"{len(unmatched)} endpoints {unmatched[0]} ... {unmatched[-1]})")
            unmatched.clear()

        for m in self.endpoints:
            if m.foreign is None:
                unmatched.append(m.name)
                continue
            flush()
            flag = "  <-- first divergence" if m.name == self.first_divergence else (
                "  !" if beyond(m, self.tolerance, self.precision) else "")
            rows.append(f"{m.name:<{width}}  {m.max_rel_err:>11.2e}  {m.cosine:>10.7f}  {m.foreign}{flag}")
        flush()
        rows.append("")
        rows += [f"note: {n}" for n in self.notes]
        rows += [f"hint: {h}" for h in self.hints]
        rows.append(self.verdict())
        return "\n".join(rows)

    def verdict(self) -> str:
        """One line: PASS / DIVERGES and where."""
        matched = self.matched
        if not matched:
            return "FAIL: no tensor of the model could be matched to an endpoint"
        worst = max(matched, key=lambda m: m.max_rel_err)
        growth = ""
        if self.precision != "float32" and len(matched) > 1:
            growth = (f"; {self.precision} error grows from {matched[0].max_rel_err:.1e} ({matched[0].name}) "
                      f"to {matched[-1].max_rel_err:.1e} ({matched[-1].name})")
        if self.passed:
            within = (f"within {self.tolerance:g} or with cosine >= {COSINE_FLOORS[self.precision]:g}"
                      if self.precision in COSINE_FLOORS else f"within {self.tolerance:g}")
            return (f"PASS: {len(matched)} of {len(self.endpoints)} endpoints match {within} "
                    f"(worst {worst.max_rel_err:.1e} at {worst.name}){growth}")
        first = next((m for m in self.endpoints if m.name == self.first_divergence), None)
        error = f" (error {first.max_rel_err:.1e})" if first and first.max_rel_err is not None else ""
        return (f"DIVERGES: first at {self.first_divergence}{error}, tolerance {self.tolerance:g}; "
                f"{len(matched)} of {len(self.endpoints)} endpoints matched{growth}")
