"""Fixtures for the report tests: a hand-built logit-lens frame and a Chromium gate."""

from __future__ import annotations

import os

import polars as pl
import pytest

# Input tokens (GPT-2 style, leading spaces and a special token) and the next tokens;
# the last position has no next token, so its target columns are null.
TOKENS = ["<|endoftext|>", "The", " quick", " brown", " fox"]
TARGETS = ["The", " quick", " brown", " fox", None]
LAYERS = [-1, 0, 1]  # -1 is the embedding output


@pytest.fixture(scope="session")
def logit_lens_rows() -> list[dict]:
    """3 layers x 5 positions; the last layer predicts the target, earlier ones " the<n>"."""
    rows = []
    for layer in LAYERS:
        for pos, (tok, target) in enumerate(zip(TOKENS, TARGETS, strict=True)):
            last = layer == LAYERS[-1]
            known = target is not None
            rows.append(
                {
                    "layer": layer,
                    "pos": pos,
                    "token_text": tok,
                    "top1_token": (target or " jumps") if last else f" the{layer + 1}",
                    "top1_prob": 0.9 if last else 0.3,
                    "target_token": target,
                    "target_prob": (0.9 if last else 0.05 * (pos + 1)) if known else None,
                    "target_rank": (1 if last else 10 - pos) if known else None,
                }
            )
    return rows


@pytest.fixture(scope="session")
def logit_lens_df(logit_lens_rows) -> pl.DataFrame:
    return pl.DataFrame(logit_lens_rows)


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium executable; skipped without one locally, a failure on CI."""
    from arrakis_ray.errors import ReportError
    from arrakis_ray.reports.browser import find_chromium

    try:
        return find_chromium()
    except ReportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so the browser test must run: {exc}")
        pytest.skip(str(exc))
