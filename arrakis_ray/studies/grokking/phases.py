"""The phases of a grokking run, read from its training curves.

The curves are in the long form of the ``training_curves`` tool (columns ``step``,
``split``, ``metric``, ``value``; splits ``train``, ``test`` and ``progress``), as the
report reads them from the store and ``tools.training_curves.read_curves`` reads them
from the shipped ``curves.parquet``.
"""

from __future__ import annotations

from typing import Any


def _first(curves: Any, split: str, metric: str, at_least: float) -> int | None:
    rows = curves[
        (curves["split"] == split) & (curves["metric"] == metric) & (curves["value"] >= at_least)
    ]
    return int(rows["step"].min()) if len(rows) else None


def phase_epochs(curves: Any) -> list[tuple[str, float, float]]:
    """``(phase, start, end)`` epochs of memorisation, circuit formation and cleanup.

    Memorisation ends when the train accuracy first reaches 100 %; circuit formation when
    the test loss, past its peak, has fallen to half of it; cleanup when the test
    accuracy first reaches 99 %.
    """
    last = float(curves["step"].max())
    memorised = _first(curves, "train", "accuracy", 1.0) or 0
    grokked = _first(curves, "test", "accuracy", 0.99) or int(last)
    test = curves[(curves["split"] == "test") & (curves["metric"] == "loss")].sort_values("step")
    after = test[test["step"] >= memorised]
    falling = int(grokked)
    if len(after):
        peak = after.loc[after["value"].idxmax()]
        half = after[(after["step"] > peak["step"]) & (after["value"] <= peak["value"] / 2)]
        falling = int(half["step"].iloc[0]) if len(half) else falling
    falling = min(max(falling, memorised), grokked)
    return [
        ("1 memorisation", 0.0, float(memorised)),
        ("2 circuit formation", float(memorised), float(falling)),
        ("3 cleanup", float(falling), float(grokked)),
        ("4 generalised", float(grokked), last),
    ]


def rise_and_fall(curves: Any) -> tuple[int | None, int | None]:
    """Epochs at which, after memorisation, the excluded loss first doubles its value at
    memorisation, and the test loss first falls below 1 nat (chance: log 113 = 4.7)."""
    memorised = _first(curves, "train", "accuracy", 1.0)
    if memorised is None:
        return None, None
    excluded = curves[(curves["split"] == "progress") & (curves["metric"] == "excluded_loss")]
    excluded = excluded[excluded["step"] >= memorised].sort_values("step")
    test = curves[(curves["split"] == "test") & (curves["metric"] == "loss")]
    test = test[test["step"] > memorised].sort_values("step")
    rose = (
        excluded[excluded["value"] > 2 * excluded["value"].iloc[0]] if len(excluded) else excluded
    )
    fell = test[test["value"] < 1.0]
    return (
        int(rose["step"].iloc[0]) if len(rose) else None,
        int(fell["step"].iloc[0]) if len(fell) else None,
    )
