"""Sweeps: one file naming a grid (or a random sample) of pipeline variants.

``spec.py`` reads a sweep file and expands it into validated pipeline configs,
``plan.py`` plans every point without Ray (run ids, tool variants, what the store
already holds), and the executor runs only what is missing.
"""
