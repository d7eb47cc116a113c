"""DRPO search over alignment instructions (system prompt and in-context examples)."""
