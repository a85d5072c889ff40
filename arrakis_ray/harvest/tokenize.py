"""The first Ray Data step of a harvest: shard descriptors -> token sequences."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pyarrow as pa

from arrakis_ray.config import PipelineConfig
from arrakis_ray.errors import DataError
from arrakis_ray.harvest.batch import SHARD_FIELDS, batch_column, batch_rows, describe_shard
from arrakis_ray.harvest.inputs import Shard, read_shard_column, read_shard_texts, read_shard_tokens
from arrakis_ray.harvest.model_source import load_tokenizer

PACKED_SEQ_STRIDE = 1 << 20  # packed mode: seq_id = shard * stride + chunk (unique, stable)


class TokenizeShard:
    """Ray Data step: shard descriptors -> token sequences.

    Per shard it emits the sequences' ids and lengths and, for every token (flat), its
    id, source document and position in that document. Documents are texts, tokenized
    here, or token ids (``data.token_column``, .npy files), checked against the
    vocabulary; either way each starts with BOS. ``data.mode``:

    - ``document``: one sequence per document, truncated to the context length;
      ``seq_id`` is the document id.
    - ``packed``: the shard's documents, each as ``<bos> text <eos>``, joined into one
      stream cut into full-length sequences (the last may be shorter); nothing is
      truncated and a sequence may span documents. ``seq_id = shard * 2**20 + chunk``.

    It also emits ``documents``: a JSON object ``{column: [value per document]}`` of
    the ``data.keep_columns`` (``{}`` when none), for ``documents_table``.
    """

    def __init__(self, config: PipelineConfig, vocab_size: int | None = None):
        self.config = config
        self.tokenizer = load_tokenizer(config.model)
        # the model's vocabulary bounds given ids; it may be padded beyond the tokenizer's
        self.vocab_size = len(self.tokenizer) if vocab_size is None else vocab_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = defaultdict(list)
        for row in batch_rows(batch):
            shard = Shard(**{k: row[k] for k in SHARD_FIELDS})
            try:
                docs = self._documents(shard)
                kept = {c: read_shard_column(shard, c) for c in self.config.data.keep_columns}
            except Exception as exc:
                raise DataError(f"{describe_shard(shard)}: {exc}") from exc
            for key in SHARD_FIELDS:
                out[key].append(row[key])
            for key, value in self._sequences(shard, docs).items():
                out[key].append(value)
            # values JSON cannot hold (dates, bytes) are kept as their text
            out["documents"].append(json.dumps(kept, default=str))
        return {k: batch_column(v) for k, v in out.items()}

    def _documents(self, shard: Shard) -> list[np.ndarray]:
        """The shard's documents as token ids, each starting with BOS."""
        data = self.config.data
        if shard.format == "npy" or data.token_column is not None:
            given = read_shard_tokens(shard, data.token_column, self.vocab_size)
            return [self._with_bos(ids) for ids in given]
        return [self._encode(text) for text in read_shard_texts(shard, data.text_column)]

    def _encode(self, text: str) -> np.ndarray:
        return self._with_bos(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _with_bos(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        bos = self.tokenizer.bos_token_id
        # every document starts with BOS, as TransformerLens does, so position 0 is a sink
        # token and not the first word; add it when the tokenizer or the data did not
        if bos is not None and (not len(ids) or ids[0] != bos):
            ids = np.concatenate([[bos], ids])
        return ids

    def _sequences(self, shard: Shard, docs: list[np.ndarray]) -> dict[str, np.ndarray]:
        """lengths and seq_ids per sequence; token_ids, doc_ids, doc_pos per token."""
        context = self.config.data.context_length
        if self.config.data.mode == "document":
            docs = [d[:context] for d in docs]
            seq_ids = shard.first_doc + np.arange(len(docs), dtype=np.int64)
            lengths = np.array([len(d) for d in docs], dtype=np.int32)
        else:
            eos = self.tokenizer.eos_token_id
            if eos is not None:  # documents end with EOS in the stream
                docs = [np.append(d, eos) for d in docs]
            total = sum(len(d) for d in docs)
            n_chunks = -(-total // context)
            lengths = np.array(
                [min(context, total - c * context) for c in range(n_chunks)], np.int32
            )
            seq_ids = shard.shard * PACKED_SEQ_STRIDE + np.arange(n_chunks, dtype=np.int64)
        doc_ids = [np.full(len(d), shard.first_doc + i, np.int64) for i, d in enumerate(docs)]
        doc_pos = [np.arange(len(d), dtype=np.int32) for d in docs]
        return {
            "lengths": lengths,
            "seq_ids": seq_ids,
            "token_ids": _flat(docs, np.int32),
            "doc_ids": _flat(doc_ids, np.int64),
            "doc_pos": _flat(doc_pos, np.int32),
        }


def documents_table(run_id: str, first_doc: int, documents_json: str) -> pa.Table:
    """The ``documents`` table of one shard from its ``documents`` JSON (as emitted by
    ``TokenizeShard``): one row per (document, kept column), in document order."""
    from arrakis_ray.store.schemas import load_schema

    kept = json.loads(documents_json)
    n_docs = max((len(v) for v in kept.values()), default=0)
    rows = [
        (first_doc + i, column, values[i]) for i in range(n_docs) for column, values in kept.items()
    ]
    return pa.table(
        {
            "run_id": [run_id] * len(rows),
            "doc_id": [doc for doc, _, _ in rows],
            "column": [column for _, column, _ in rows],
            "value": [v if v is None or isinstance(v, str) else json.dumps(v) for _, _, v in rows],
        },
        schema=load_schema("documents").arrow(),
    )


def _flat(parts: list, dtype) -> np.ndarray:
    return (
        np.concatenate([np.asarray(p, dtype=dtype) for p in parts])
        if parts
        else (np.zeros(0, dtype))
    )
