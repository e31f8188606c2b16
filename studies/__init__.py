"""The shipped study configs, installed as ``projlens_mi.studies`` (``projlens demo`` runs quickstart.toml)."""
