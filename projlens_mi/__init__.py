"""projlens_mi: mechanistic interpretability of projector backdoors in vision-language models."""

__version__ = "0.1.0"
