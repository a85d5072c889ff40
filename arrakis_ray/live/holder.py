"""ModelHolder: one model, or one pipeline stage of it, loaded once on its device.

A Ray actor that runs a model (the harvest's ``HarvestStage``, the live tools'
``LiveActor``) needs the same four things: the device Ray assigned, a thread count that
leaves room for the other actors on a CPU node, the weights loaded once, and a lock so
that two concurrent calls never run the model at once.
"""

from __future__ import annotations

import os
import threading

from arrakis_ray.config import ModelConfig


class ModelHolder:
    """A HookedModel holding blocks ``[start, stop)`` on the device Ray assigned.

    ``num_gpus``: the GPUs this actor asked Ray for; Ray sets CUDA_VISIBLE_DEVICES to
    them, so ``cuda`` (device 0) is this actor's. ``sharing``: actors sharing this
    node's cores (replicas x stages), to divide the CPU threads among them.
    """

    def __init__(
        self,
        model: ModelConfig,
        stage: tuple[int, int] | None = None,
        num_gpus: float = 0.0,
        sharing: int = 1,
    ):
        import torch

        from arrakis_ray.harvest.model_source import load_model
        from arrakis_ray.models.stage import StageModel

        use_gpu = num_gpus > 0 and torch.cuda.is_available()
        self.device = "cuda" if use_gpu else "cpu"
        if not use_gpu:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, sharing)))
        hooked = load_model(model, device="cpu")
        start, stop = stage or (0, hooked.n_layers)
        stage_model = StageModel(hooked, start, stop)  # frees the other stages' blocks
        hooked.model.to(self.device)
        hooked.device = torch.device(self.device)
        self._hold(hooked, stage_model)

    @classmethod
    def shared(
        cls,
        model: ModelConfig,
        stage: tuple[int, int] | None = None,
        num_gpus: float = 0.0,
        sharing: int = 1,
    ) -> ModelHolder:
        """The holder of this model stage in this process, loaded on the first call.

        A sweep's warm actors (``sweeps/warm.py``) harvest one run after another in one
        process: the model is loaded once per actor, not once per run. One holder is
        kept (the last one asked for), so a process moving on to another model frees the
        previous one. Runs share it one at a time: it carries its lock.
        """
        import json

        from arrakis_ray.config import to_dict

        # the checkpoint's file stamps too: a checkpoint rewritten in place (a nightly
        # "latest/") is loaded again, never served stale from the last load
        key = (
            json.dumps(to_dict(model), sort_keys=True),
            _checkpoint_stamps(model),
            stage,
            num_gpus,
            sharing,
        )
        held = _SHARED.get(key)
        if held is None:
            _SHARED.clear()  # before loading: never two models in memory at once
            held = _SHARED[key] = cls(model, stage, num_gpus=num_gpus, sharing=sharing)
            cls.loads += 1
        return held

    loads = 0  # models this process loaded through ``shared`` (warm-actor statistics)

    def _hold(self, hooked, stage_model) -> None:
        """What every holder has, however its model came: the one place to add to."""
        self.stage = stage_model
        self.model = hooked
        self.lock = threading.Lock()  # one call at a time runs the model

    @classmethod
    def wrapping(cls, hooked) -> ModelHolder:
        """A holder of a HookedModel already built in this process (the bench's model),
        whole and where it is: nothing is loaded, moved or freed."""
        from arrakis_ray.models.stage import StageModel

        holder = cls.__new__(cls)  # not __init__: that loads a model from its config
        holder.device = str(hooked.device)
        holder._hold(hooked, StageModel(hooked, 0, hooked.n_layers))
        return holder


_SHARED: dict[tuple, ModelHolder] = {}  # ModelHolder.shared's one holder


def _checkpoint_stamps(model: ModelConfig) -> tuple:
    """(name, size, mtime_ns) of the files of the model's checkpoint directory; for a
    custom model, its code's stamp and its checkpoint file's."""
    from pathlib import Path

    from arrakis_ray.harvest.model_source import checkpoint_dir

    if model.factory:  # the checkpoint file (if any) and the code that builds the model
        from arrakis_ray.harvest.facts_cache import factory_code_stamp

        stamps: tuple = (factory_code_stamp(model.factory),)
        file = Path(model.checkpoint or "").expanduser()
        if model.checkpoint and file.is_file():  # a missing one: loading says so
            stamps += ((file.name, file.stat().st_size, file.stat().st_mtime_ns),)
        return stamps
    directory = checkpoint_dir(model)
    if directory is None:
        return ()
    return tuple(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(directory.iterdir())
        if p.is_file()
    )


def weights_digest(module) -> str:
    """A digest of every parameter and buffer, bit for bit (for "weights untouched")."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict(keep_vars=False).items()):
        digest.update(name.encode())
        raw = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8)  # any dtype
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()
