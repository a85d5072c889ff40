"""Grokking modular addition (Nanda et al. 2023), issue 15 part 2.

- ``model``: the one-layer transformer as a custom model (``build`` is the factory);
- ``task``: the 113^2 inputs ``a b =``, their labels and the seeded 30 % split;
- ``fourier``: the Fourier basis and the paper's measures (numpy);
- ``phases``: the phases of training, read from the curves;
- ``train``: ``python -m arrakis_ray.studies.grokking.train`` writes ``checkpoints/``.

The study itself is ``pipelines/studies/grokking.yaml``; its tools live in
``arrakis_ray/tools`` (fourier_embedding, fourier_neurons, attention_to_equals,
progress_measures, training_curves) and its page in ``arrakis_ray/reports/grokking_report.py``.
"""
