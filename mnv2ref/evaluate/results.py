"""Per-image results as JSON lines, and the summary with confidence intervals.

The results file is an append-only log, one JSON object per image::

    {"image": ".../ILSVRC2012_val_00000001.JPEG", "label": 66,
     "top5": [66, 68, 59, 65, 61], "probs": [0.81, 0.05, ...]}

(`probs` are the top-5 probabilities; with a foreign model also
`reference_top5`, `reference_probs` and `gap`, the largest absolute
difference of the two probability vectors). An image that could not be read
is a line ``{"image", "label", "error"}``, so that a resumed run neither
retries nor forgets it.

Why append and not `files.atomic_write`: a 50,000-image run must not lose
what it has done when it stops, and rewriting the whole file per batch would
cost quadratic time. Each batch is therefore one `write` of whole lines,
flushed, with SIGINT/SIGTERM held off during it; the only damage a hard crash
(power loss, `kill -9`) can leave is an incomplete last line, which
`ResultsLog(resume=True)` cuts off before appending.
"""

from __future__ import annotations

import json
import math
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterable, List

from ..errors import InputError
from ..files import os_error, write_json

#: The model card's figures for mobilenet_v2_1.0_224 on ILSVRC2012 validation.
CARD = {"top1": 0.7185, "top5": 0.9069}
#: Two-sided 95 % normal quantile, for the Wilson score interval.
Z95 = 1.959963984540054


class ResultsLog:
    """The JSONL results of one run: `done` (image -> record) already there
    with `resume`, `append(records)` to add a batch. The file is opened on the
    first `append`; without `resume` that replaces an existing file."""

    def __init__(self, path, resume: bool = False):
        self.path, self.resume = Path(path), resume
        self.done: Dict[str, dict] = {}
        self._file = None
        if str(path) == "-":  # stdout, for a pipe: nothing to resume
            if resume:
                raise InputError("--resume needs a results file, not -o - (stdout)")
            self._file = sys.stdout
        elif resume and self.path.exists():
            try:
                self.done = self._read_and_repair()
            except OSError as error:
                raise os_error(error, self.path, "read results file") from None

    def _read_and_repair(self) -> Dict[str, dict]:
        """Records already in the file; an incomplete last line is cut off."""
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # bytes up to the last complete line
        done = {}
        for number, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                done[record["image"]] = record
            except (ValueError, KeyError, TypeError):
                raise InputError(f"{self.path}:{number}: not a results line ({line[:80]!r}); "
                                 "--resume needs a file written by mnv2ref evaluate") from None
        if end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)
        return done

    def append(self, records: Iterable[dict]) -> None:
        """Write `records` as whole lines and flush, uninterrupted by SIGINT/SIGTERM."""
        text = "".join(json.dumps(r, separators=(", ", ": ")) + "\n" for r in records)
        with _signals_held():
            try:
                if self._file is None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._file = open(self.path, "a" if self.resume else "w", encoding="utf-8")
                self._file.write(text)
                self._file.flush()
            except OSError as error:
                raise os_error(error, self.path, "write") from None

    def close(self) -> None:
        if self._file not in (None, sys.stdout):
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextmanager
def _signals_held():
    """Defer SIGINT and SIGTERM (delivered on exit) where the platform allows it."""
    held = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def wilson_interval(successes: int, trials: int, z: float = Z95) -> List[float]:
    """The Wilson score interval [low, high] of a binomial proportion (95 % by default).

    Chosen over the normal approximation because it stays inside [0, 1] and
    keeps close to its nominal coverage for small sets and proportions near
    0 or 1; for 50,000 images it differs from Clopper-Pearson by < 1e-4."""
    if trials == 0:
        return [0.0, 1.0]
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    # At 0 or n successes the bound is exactly 0 or 1; say so without rounding noise.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return [low, high]


def summarize(records: Iterable[dict]) -> dict:
    """The summary of per-image records (see the module docstring):
    ``images`` (scored), ``top1``, ``top5`` (fractions), ``top1_ci``,
    ``top5_ci`` (95 % Wilson), ``skipped`` (count), ``skipped_images``,
    ``images_per_s`` (None: the caller knows the time), ``card``,
    and for records of a foreign model ``reference_top1``,
    ``reference_top5``, ``top1_agreement``, ``max_gap`` and
    ``top1_differs`` (the images whose top-1 is not the reference's)."""
    records = list(records)
    scored = [r for r in records if "error" not in r]
    skipped = [r["image"] for r in records if "error" in r]
    n = len(scored)
    top1 = sum(r["top5"][0] == r["label"] for r in scored)
    top5 = sum(r["label"] in r["top5"] for r in scored)
    summary = {
        "images": n,
        "top1": top1 / n if n else None,
        "top5": top5 / n if n else None,
        "top1_correct": top1,
        "top5_correct": top5,
        "top1_ci": wilson_interval(top1, n),
        "top5_ci": wilson_interval(top5, n),
        "skipped": len(skipped),
        "skipped_images": skipped,
        "images_per_s": None,
        "card": dict(CARD),
    }
    if scored and "reference_top5" in scored[0]:
        differs = [r["image"] for r in scored if r["top5"][0] != r["reference_top5"][0]]
        summary.update(
            reference_top1=sum(r["reference_top5"][0] == r["label"] for r in scored) / n,
            reference_top5=sum(r["label"] in r["reference_top5"] for r in scored) / n,
            top1_agreement=1 - len(differs) / n,
            max_gap=max(r["gap"] for r in scored),
            top1_differs=differs)
    return summary


def card_comparison(summary: dict) -> List[str]:
    """Lines saying whether the card's top-1 / top-5 lie inside the 95 % intervals."""
    lines = []
    for key in ("top1", "top5"):
        low, high = summary[f"{key}_ci"]
        card = CARD[key]
        where = "inside" if low <= card <= high else "outside"
        lines.append(f"model card {key} {card:.2%} is {where} the 95 % interval "
                     f"[{low:.2%}, {high:.2%}] of the measured {summary[key]:.2%}")
    return lines


def format_summary(summary: dict) -> str:
    """The summary as the lines `mnv2ref evaluate` prints on stdout."""
    n = summary["images"]
    lines = [f"images {n}, skipped {summary['skipped']}"]
    if n:
        lines += [f"top-1 {summary['top1']:.4%} ({summary['top1_correct']}/{n}), "
                  f"95 % CI [{summary['top1_ci'][0]:.2%}, {summary['top1_ci'][1]:.2%}]",
                  f"top-5 {summary['top5']:.4%} ({summary['top5_correct']}/{n}), "
                  f"95 % CI [{summary['top5_ci'][0]:.2%}, {summary['top5_ci'][1]:.2%}]"]
        lines += card_comparison(summary)
    if summary.get("images_per_s"):
        lines.append(f"{summary['images_per_s']:.1f} images/s")
    if "top1_agreement" in summary:
        lines.append(f"agreement with the reference: top-1 {summary['top1_agreement']:.4%}, "
                     f"largest probability gap {summary['max_gap']:.3g}; reference top-1 "
                     f"{summary['reference_top1']:.4%}, top-5 {summary['reference_top5']:.4%}")
        lines += [f"top-1 differs: {image}" for image in summary["top1_differs"]]
    lines += [f"skipped: {image}" for image in summary["skipped_images"]]
    return "\n".join(lines)


def write_summary(summary: dict, path) -> None:
    """The summary as JSON, to `path` (atomically) or to stdout for ``-``."""
    write_json(path, summary)
