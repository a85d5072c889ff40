"""A version-1 manifest (free-form JSON, before ``RunManifest``) read as version 2, in
memory: what v1 did not record is filled in from the architecture's defaults."""

from __future__ import annotations

from arrakis_ray.errors import StoreError

_DATA_KEYS = ("path", "fingerprint", "n_documents", "n_sequences", "n_shards")  # DataInfo


def upgrade_v1(old: dict, where: str) -> dict:
    """A version-1 manifest (free-form JSON) as version 2, in memory."""
    try:
        model = old["model"]
        arch = model["arch"]
        shape = {
            "arch": arch,
            "n_layers": model["n_layers"],
            "d_model": model["d_model"],
            "d_mlp": model["d_mlp"],
            "n_heads": model["n_heads"],
            "n_kv_heads": model.get("n_kv_heads", model["n_heads"]),
            "d_head": model["d_head"],
            "d_vocab": model["vocab_size"],
            **_V1_ARCH_DEFAULTS.get(arch, _V1_ARCH_DEFAULTS["llama"]),
        }
        overrides = ((old.get("config") or {}).get("model") or {}).get("config") or {}
        if "use_parallel_residual" in overrides:  # gpt-neox, stablelm: the config decides
            shape["parallel_blocks"] = bool(overrides["use_parallel_residual"])
        harvest = dict(old.get("harvest") or {})
        calls = [
            {k: c.get(k, 0) for k in ("finished_at", "shards", "tokens", "bytes", "sequences")}
            | {"seconds": c.get("seconds", 0.0)}
            for c in harvest.get("calls", [])
        ]
        for c in calls:
            c["finished_at"] = c["finished_at"] or old.get("created_at", "?")
        return {
            "run_id": old["run_id"],
            "name": old.get("name") or old["run_id"],
            "status": old["status"],
            "created_at": old["created_at"],
            "updated_at": old.get("updated_at"),
            "config": old["config"],
            "hooks": old["hooks"],
            "shape": shape,
            "model_source": model.get("source", "?"),
            "model_fingerprint": model.get("fingerprint", "?"),
            "data": {k: old["data"][k] for k in _DATA_KEYS},
            "shard_plan": old["shard_plan"],
            "stages": old["stages"],
            "schemas": old.get("schemas", {}),
            "harvest": {
                "predicted_max_bytes": harvest.get("predicted_max_bytes", 0),
                "resumed": harvest.get("resumed", False),
                "calls": calls,
            },
            "versions": old.get("versions", {}),
            "error": old.get("error"),
            "results": old.get("results", {}),
        }
    except (KeyError, TypeError) as exc:
        raise StoreError(
            f"{where}: version-1 manifest lacks {exc}; it cannot be upgraded: harvest the "
            "run again into a new store"
        ) from None


# What a version-1 manifest did not record, by architecture, as the adapters build them
# by default (a random-init gpt-neox or stablelm's parallel flag is read from its config
# overrides; a checkpoint's is not in the manifest, so its default is assumed).
_V1_ARCH_DEFAULTS = {
    "gpt2": {"norm": "layernorm", "positional": "learned", "parallel_blocks": False},
    "gpt-neo": {"norm": "layernorm", "positional": "learned", "parallel_blocks": False},
    "gpt-neox": {"norm": "layernorm", "positional": "rotary", "parallel_blocks": True},
    "stablelm": {"norm": "layernorm", "positional": "rotary", "parallel_blocks": False},
    "phi3": {"norm": "rmsnorm", "positional": "rotary", "parallel_blocks": False},
    "llama": {"norm": "rmsnorm", "positional": "rotary", "parallel_blocks": False},
    "gemma": {"norm": "rmsnorm", "positional": "rotary", "parallel_blocks": False},
    "qwen2": {"norm": "rmsnorm", "positional": "rotary", "parallel_blocks": False},
    "mistral": {"norm": "rmsnorm", "positional": "rotary", "parallel_blocks": False},
}
