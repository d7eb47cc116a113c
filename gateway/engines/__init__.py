"""Model servers that the gateway starts and stops itself."""

from gateway.engines.embedded import (
    DEFAULT_ALIAS,
    ModelInfo,
    embedded_model_info,
    embedded_server,
    resolve_model_path,
)
from gateway.engines.process import ManagedServer, pick_free_port
from gateway.engines.vllm import vllm_server

__all__ = [
    "DEFAULT_ALIAS",
    "ManagedServer",
    "ModelInfo",
    "embedded_model_info",
    "embedded_server",
    "pick_free_port",
    "resolve_model_path",
    "vllm_server",
]
