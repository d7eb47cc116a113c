"""OpenAI-compatible gateway that injects a DRPO alignment instruction."""

__version__ = "0.1.0"
