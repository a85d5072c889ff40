"""The bench's ``profile_model``: per-module time and memory of real forwards.

``ModuleProfiler`` is what the decorator wraps around a user's function: while it is
active, torch forward pre- and post-hooks on the model's modules record every forward
the function makes, however it makes them (``run_with_cache``, a tool, ``model.model``
called directly) in this process; a tool run through Ray on a stored run forwards in
its own workers, which this does not see. The original Arrakis registered a generator
function as a hook, which only builds a generator and never runs its body; these hooks
are plain functions, and a test counts their calls against the forwards made.

Modules are named as the ``profile_model`` tool names them and found through the
model's adapter: ``embed`` (token and any position embedding), ``blocks.L.attn`` (ln1
and the attention), ``blocks.L.mlp`` (ln2, if any, and the mlp), ``ln_final`` and
``unembed``. Per module:

- ``calls``: completed forwards of its main module (the embedding, the attention,
  the mlp, the final norm, the unembedding);
- ``seconds``: time inside its modules (``time.perf_counter`` at each module's pre- and
  post-hook, after a CUDA synchronize on a GPU), summed over calls;
- ``share_of_time``: its seconds over all modules' seconds (null before any forward);
- ``output_bytes``: bytes of every tensor the main module returned, summed over calls;
  ``peak_output_bytes`` the largest of one call;
- ``params``: the tool's count (``parameter_counts``: a tied unembedding counts 0);
- ``cuda_peak_bytes``: on CUDA, the most memory allocated during one call of a module
  above what was allocated when it started (peak statistics are reset at each module's
  start, so a caller's own ``max_memory_allocated`` reading spans only the last module);
  null on CPU.

``profile_forward`` runs the ``profile_model`` tool itself in this process, so the
bench's method and ``arrakis-ray analyze --tool profile_model`` give one table.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from arrakis_ray.errors import ToolError
from arrakis_ray.models.adapters import get_module
from arrakis_ray.tools.profile_model import modules_of, parameter_counts

if TYPE_CHECKING:
    from collections.abc import Callable

    import polars as pl
    from torch import nn

    from arrakis_ray.models.hooked import HookedModel

log = logging.getLogger(__name__)


@dataclass
class _Tally:
    """What one profiled module has recorded so far."""

    calls: int = 0
    seconds: float = 0.0
    output_bytes: int = 0
    peak_output_bytes: int = 0
    cuda_peak_bytes: int | None = None


@dataclass(frozen=True)
class _Timed:
    """What one hooked torch module counts for: a profiled name, and whether it is that
    name's main module (the one whose calls and output are counted)."""

    name: str
    main: bool


class ModuleProfiler:
    """Context manager recording every forward of each profiled module of ``model``.

    Entering resets the tallies and registers the hooks; leaving removes them, also
    when the body raised. ``table()`` reads the tallies, inside or after the block.
    """

    def __init__(self, model: HookedModel):
        self.model = model
        self._modules = modules_of(model.n_layers)
        self._params = parameter_counts(model)
        self._hooked = _hooked_modules(model)
        self._tallies: dict[str, _Tally] = {}
        self._started: dict[int, tuple[float, int]] = {}  # id(module) -> (time, cuda bytes)
        self._handles: list[Any] = []
        self._cuda = model.device.type == "cuda"
        self._reset()

    def _reset(self) -> None:
        self._tallies = {m.name: _Tally() for m in self._modules}
        self._started = {}

    def __enter__(self) -> ModuleProfiler:
        if self._handles:
            raise ToolError("ModuleProfiler: already active; leave it before entering again")
        self._reset()
        try:
            for module, timed in self._hooked:
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(timed)))
                self._handles.append(module.register_forward_hook(self._post_hook(timed)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._started = {}

    # ------------------------------------------------------------------ hooks

    def _stamp(self) -> float:
        if self._cuda:
            import torch

            torch.cuda.synchronize(self.model.device)  # the kernels queued so far are done
        return time.perf_counter()

    def _pre_hook(self, timed: _Timed) -> Callable:
        def pre_hook(module: nn.Module, _args: tuple) -> None:
            allocated = 0
            if self._cuda:
                import torch

                allocated = torch.cuda.memory_allocated(self.model.device)
                torch.cuda.reset_peak_memory_stats(self.model.device)
            self._started[id(module)] = (self._stamp(), allocated)

        return pre_hook

    def _post_hook(self, timed: _Timed) -> Callable:
        def post_hook(module: nn.Module, _args: tuple, output: Any) -> None:
            now = self._stamp()
            started = self._started.pop(id(module), None)
            if started is None:  # entered mid-forward: this call began before the hooks
                return
            tally = self._tallies[timed.name]
            tally.seconds += now - started[0]
            if self._cuda:
                import torch

                peak = torch.cuda.max_memory_allocated(self.model.device) - started[1]
                tally.cuda_peak_bytes = max(tally.cuda_peak_bytes or 0, peak)
            if timed.main:
                size = tensor_bytes(output)
                tally.calls += 1
                tally.output_bytes += size
                tally.peak_output_bytes = max(tally.peak_output_bytes, size)

        return post_hook

    # ------------------------------------------------------------------ result

    def table(self) -> pl.DataFrame:
        """One row per module in forward order: module, kind, layer, calls, seconds,
        share_of_time, output_bytes, peak_output_bytes, params, cuda_peak_bytes."""
        import polars as pl

        total = sum(t.seconds for t in self._tallies.values())
        rows = []
        for m in self._modules:
            t = self._tallies[m.name]
            rows.append(
                {
                    "module": m.name,
                    "kind": m.kind,
                    "layer": m.layer,
                    "calls": t.calls,
                    "seconds": t.seconds,
                    "share_of_time": t.seconds / total if total > 0 else None,
                    "output_bytes": t.output_bytes,
                    "peak_output_bytes": t.peak_output_bytes,
                    "params": self._params[m.kind],
                    "cuda_peak_bytes": t.cuda_peak_bytes,
                }
            )
        schema = {name: getattr(pl, dtype) for name, dtype in PROFILER_COLUMNS}
        return pl.DataFrame(rows, schema=schema)


PROFILER_COLUMNS = (
    ("module", "String"),
    ("kind", "String"),
    ("layer", "Int64"),
    ("calls", "Int64"),
    ("seconds", "Float64"),
    ("share_of_time", "Float64"),
    ("output_bytes", "Int64"),
    ("peak_output_bytes", "Int64"),
    ("params", "Int64"),
    ("cuda_peak_bytes", "Int64"),
)
"""The profiler table's columns and their Polars types (by name)."""


def _hooked_modules(model: HookedModel) -> list[tuple[nn.Module, _Timed]]:
    """(torch module, what it counts for) of every profiled name, in forward order."""
    a, root = model.adapter, model.model
    found: list[tuple[nn.Module, _Timed]] = []

    def add(name: str, main: nn.Module, *helpers: nn.Module | None) -> None:
        found.extend((h, _Timed(name, False)) for h in helpers if h is not None)
        found.append((main, _Timed(name, True)))

    add("embed", get_module(root, a.embed), a.pos_embed and get_module(root, a.pos_embed))
    for layer, block in enumerate(a.layer_modules(root)):
        ln2 = get_module(block, a.ln2) if a.ln2 else None  # None in a parallel stablelm block
        ln1 = get_module(block, a.ln1) if a.ln1 else None  # None in a model without norms
        add(f"blocks.{layer}.attn", get_module(block, a.attn), ln1)
        add(f"blocks.{layer}.mlp", get_module(block, a.mlp), ln2)
    if a.final_norm is not None:
        add("ln_final", get_module(root, a.final_norm))
    add("unembed", get_module(root, a.lm_head))
    return found


def tensor_bytes(value: Any) -> int:
    """Bytes of every distinct tensor in a module's output (tuples, lists, dicts and HF
    ModelOutputs are searched; None and other values count 0)."""
    import torch

    seen: set[int] = set()

    def walk(v: Any) -> int:
        if isinstance(v, torch.Tensor):
            if id(v) in seen:
                return 0
            seen.add(id(v))
            return v.numel() * v.element_size()
        if isinstance(v, dict):
            return sum(walk(x) for x in v.values())
        if isinstance(v, list | tuple):
            return sum(walk(x) for x in v)
        return 0

    return walk(value)


def profile_call(
    model: HookedModel, fn: Callable, *args: Any, **kwargs: Any
) -> tuple[Any, pl.DataFrame]:
    """``fn(*args, **kwargs)`` under a ``ModuleProfiler``: (its result, the table)."""
    with ModuleProfiler(model) as profiler:
        result = fn(*args, **kwargs)
    return result, profiler.table()


def profile_forward(
    model: HookedModel,
    input_ids: Any = None,
    *,
    batch_size: int = 4,
    seq_len: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    run_id: str = "bench",
) -> pl.DataFrame:
    """The ``profile_model`` tool's table for ``model``, computed in this process.

    Params, FLOPs and activation bytes per token, and the median seconds per forward
    of each module (``tools/profile_model.py`` says how each is counted). ``input_ids``
    (``(batch, pos)`` or ``(pos,)``), when given, sets ``batch_size`` and ``seq_len``
    from its shape: the tool times random tokens of that shape, as a forward's time does
    not depend on which tokens it reads. ``run_id`` fills the table's ``run_id`` column
    (``"bench"``: the model profiled is the bench's, not a stored run's).
    """
    import polars as pl
    import pyarrow as pa

    from arrakis_ray.live.model import live_model_of
    from arrakis_ray.tools.profile_model import ProfileModel
    from arrakis_ray.tools.runner import make_tool

    if input_ids is not None:
        batch_size, seq_len = _shape_of(input_ids)
    params = {"batch_size": batch_size, "seq_len": seq_len, "repeats": repeats, "warmup": warmup}
    tool = make_tool(ProfileModel, params, source="profile_model")
    items = pa.table({"item": pa.array([0], pa.int64()), "run_id": pa.array([run_id], pa.string())})
    return pl.from_arrow(tool.compute_live(items, live_model_of(model)))


def _shape_of(input_ids: Any) -> tuple[int, int]:
    """(batch, pos) of token ids given as a tensor, an array or a list."""
    import torch

    try:
        shape = tuple(torch.as_tensor(input_ids).shape)
    except (TypeError, ValueError) as exc:
        raise ToolError(
            f"profile_model: input_ids is not a rectangular list of ids ({exc})"
        ) from None
    if len(shape) == 1:
        shape = (1, *shape)
    if len(shape) != 2 or 0 in shape:
        raise ToolError(
            f"profile_model: input_ids must be (batch, pos) token ids, got shape {shape}"
        )
    return int(shape[0]), int(shape[1])
