"""arrakis-ray: distributed mechanistic interpretability on Ray, Parquet and DuckDB."""

__version__ = "0.1.0"
