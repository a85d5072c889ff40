"""Leviathan: a correlation-attention char LM against a GPT-2-style baseline (issue 15, part 3)."""
