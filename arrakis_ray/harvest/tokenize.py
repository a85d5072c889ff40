"""The first Ray Data step of a harvest: shard descriptors -> token sequences."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from arrakis_ray.config import PipelineConfig
from arrakis_ray.errors import DataError
from arrakis_ray.harvest.batch import SHARD_FIELDS, batch_column, batch_rows, describe_shard
from arrakis_ray.harvest.inputs import Shard, read_shard_texts
from arrakis_ray.harvest.model_source import load_tokenizer

PACKED_SEQ_STRIDE = 1 << 20  # packed mode: seq_id = shard * stride + chunk (unique, stable)


class TokenizeShard:
    """Ray Data step: shard descriptors -> token sequences.

    Per shard it emits the sequences' ids and lengths and, for every token (flat), its
    id, source document and position in that document. ``data.mode``:

    - ``document``: one sequence per document, truncated to the context length;
      ``seq_id`` is the document id.
    - ``packed``: the shard's documents, each as ``<bos> text <eos>``, joined into one
      stream cut into full-length sequences (the last may be shorter); nothing is
      truncated and a sequence may span documents. ``seq_id = shard * 2**20 + chunk``.
    """

    def __init__(self, config: PipelineConfig):
        self.config = config
        self.tokenizer = load_tokenizer(config.model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = defaultdict(list)
        for row in batch_rows(batch):
            shard = Shard(**row)
            try:
                texts = read_shard_texts(shard, self.config.data.text_column)
                docs = [self._encode(t) for t in texts]
            except Exception as exc:
                raise DataError(f"{describe_shard(shard)}: {exc}") from exc
            context = self.config.data.context_length
            doc_ids = [np.full(len(d), shard.first_doc + i, np.int64) for i, d in enumerate(docs)]
            doc_pos = [np.arange(len(d), dtype=np.int32) for d in docs]
            if self.config.data.mode == "document":
                seqs = [d[:context] for d in docs]
                doc_ids = [x[:context] for x in doc_ids]
                doc_pos = [x[:context] for x in doc_pos]
                seq_ids = shard.first_doc + np.arange(len(seqs), dtype=np.int64)
                flat_ids, flat_docs, flat_pos = (
                    _flat(seqs, np.int32),
                    _flat(doc_ids, np.int64),
                    _flat(doc_pos, np.int32),
                )
                lengths = np.array([len(x) for x in seqs], dtype=np.int32)
            else:
                eos = self.tokenizer.eos_token_id
                if eos is not None:  # documents end with EOS in the stream
                    docs = [[*d, eos] for d in docs]
                    doc_ids = [np.append(x, x[0] if len(x) else 0) for x in doc_ids]
                    doc_pos = [np.arange(len(d), dtype=np.int32) for d in docs]
                flat_ids, flat_docs, flat_pos = (
                    _flat(docs, np.int32),
                    _flat(doc_ids, np.int64),
                    _flat(doc_pos, np.int32),
                )
                n_chunks = -(-len(flat_ids) // context)
                lengths = np.array(
                    [min(context, len(flat_ids) - c * context) for c in range(n_chunks)], np.int32
                )
                seq_ids = shard.shard * PACKED_SEQ_STRIDE + np.arange(n_chunks, dtype=np.int64)
            for key in SHARD_FIELDS:
                out[key].append(row[key])
            out["lengths"].append(lengths)
            out["seq_ids"].append(seq_ids)
            out["token_ids"].append(flat_ids)
            out["doc_ids"].append(flat_docs)
            out["doc_pos"].append(flat_pos)
        return {k: batch_column(v) for k, v in out.items()}

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        bos = self.tokenizer.bos_token_id
        # every document starts with BOS, as TransformerLens does, so position 0 is a sink
        # token and not the first word; add it when the tokenizer's template does not
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids


def _flat(parts: list, dtype) -> np.ndarray:
    return (
        np.concatenate([np.asarray(p, dtype=dtype) for p in parts])
        if parts
        else (np.zeros(0, dtype))
    )
