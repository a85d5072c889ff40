"""Data package: the versioned table schemas (``*.json``), shipped as ``arrakis_ray.schemas``.

No code lives here; this file only lets the build map the folder into the package
(pyproject.toml) so that installed and editable copies find it the same way.
"""
