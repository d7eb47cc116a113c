"""Choice of injection mode (chat or base) per model."""

from __future__ import annotations

from gateway.settings import InjectionMode, Settings


class ModeResolver:
    """Resolve the injection mode of a model name.

    A model configured as chat or base keeps that mode. "auto" takes the mode
    detected for the upstream at start-up: base for the embedded GGUF model
    when its metadata has no chat template, chat for any other server.
    """

    def __init__(self, settings: Settings, detected: InjectionMode) -> None:
        if detected is InjectionMode.AUTO:
            raise ValueError("the detected mode must be chat or base")
        self._settings = settings
        self._detected = detected

    def __call__(self, model: str) -> InjectionMode:
        mode = self._settings.mode_for(model)
        return self._detected if mode is InjectionMode.AUTO else mode
