"""``exp.map``: a bench function over a parameter grid, as Ray tasks.

The decorated function itself goes to the workers (put in Ray's object store once,
with the bench and its model it closes over, its module pickled by value), so each call
records exactly as a direct call does: its hypothesis test, chart or profile included,
in the same store.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from arrakis_ray.errors import ArrakisError, DataError, RemoteTaskError


def grid_points(grid) -> list[dict[str, Any]]:
    """Keyword dicts of a grid: a dict of parameter -> values (every combination, in
    order), or a list of keyword dicts."""
    if isinstance(grid, Mapping):
        values = {}
        for key, options in grid.items():
            if isinstance(options, str) or not isinstance(options, Iterable):
                raise DataError(
                    f"map: grid parameter {key!r} needs a list of values, got {options!r}"
                )
            values[key] = list(options)
            if not values[key]:
                raise DataError(f"map: grid parameter {key!r} has no values")
        combos = itertools.product(*values.values())
        return [dict(zip(values, combo, strict=True)) for combo in combos]
    points = [dict(p) for p in grid]
    if not points:
        raise DataError("map: the grid is empty")
    return points


def run_points(fn: Callable, points: list[dict[str, Any]], num_cpus: float) -> list:
    """``fn(**point)`` for every point as Ray tasks; results in order. Failed calls give
    None and, once all have run, one error naming how many failed."""
    import ray

    from arrakis_ray.ray_session import ensure_ray, ray_errors

    ensure_ray()
    _by_value(fn)
    shipped = ray.put(fn)  # the function and the bench (its model): once, not per task
    task = ray.remote(num_cpus=num_cpus)(_call_point)
    refs = [task.remote(shipped, point) for point in points]
    results, failed = [], []
    for point, ref in zip(points, refs, strict=True):
        try:
            with ray_errors(f"experiment {fn.__name__}"):
                results.append(ray.get(ref))
        except ArrakisError as e:
            results.append(None)
            failed.append((point, e))
    if failed:
        point, error = failed[0]
        raise RemoteTaskError(
            f"{len(failed)} of {len(points)} calls of {fn.__name__} failed (each is "
            f"recorded); first, at {point}: {error}"
        )
    return results


def _by_value(fn: Callable) -> None:
    """Pickle the user's module by value: by reference, a worker would import it again,
    running its top level (a new bench, another model) instead of using this one."""
    import sys

    from ray import cloudpickle

    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    if module is None or module.__name__ == "__main__" or module.__name__.startswith("arrakis_ray"):
        return  # __main__ goes by value anyway; the package is installed on the workers
    cloudpickle.register_pickle_by_value(module)


def _call_point(fn: Callable, point: dict[str, Any]):
    """One grid point, in a Ray worker: the decorated function, recording as it does."""
    return fn(**point)
