"""Data package: the shipped pipeline specs (``*.yaml``, ``data/``), as ``arrakis_ray.pipelines``.

No code lives here; this file only lets the build map the folder into the package
(pyproject.toml) so that installed and editable copies find it the same way.
"""
