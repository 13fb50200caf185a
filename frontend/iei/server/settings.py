"""What the HTTP frontend reads from the environment (the table is `iei.settings.SETTINGS`)."""

from __future__ import annotations

from dataclasses import replace
from functools import cached_property

from pydantic import SecretStr, field_validator, model_validator

from ..contract import IN_USE_SECONDS
from ..models import NAME, ModelsError, ServedModel, parse_models, single_model
from ..settings import SETTINGS, SettingsBase, setting


class ServerSettings(SettingsBase):
    """The frontend's settings; see the README's table."""

    embedding_model: str = setting("embedding_model", min_length=1)
    concurrency_level: int = setting("concurrency_level", ge=1, le=4096)
    max_client_batch_size: int = setting("max_client_batch_size", ge=1, le=4096)
    max_image_pixels: int = setting("max_image_pixels", ge=1)
    max_text_chars: int = setting("max_text_chars", ge=1, le=1_000_000)
    request_timeout: float = setting("request_timeout", gt=0, le=3600)
    payload_limit: int = setting("payload_limit", ge=1024)
    body_worker_max_bytes: int = setting("body_worker_max_bytes", ge=1024)
    body_read_timeout: float = setting("body_read_timeout", gt=0, le=3600)
    max_concurrent_images: int = setting("max_concurrent_images", ge=1)
    api_key: SecretStr | None = setting("api_key")
    served_model_name: str | None = setting("served_model_name")
    allow_private_urls: bool = setting("allow_private_urls")
    url_timeout: float = setting("url_timeout", gt=0, le=600)
    url_max_bytes: int = setting("url_max_bytes", ge=1024)
    url_request_max_bytes: int = setting("url_request_max_bytes", ge=1024)
    url_worker_max_bytes: int = setting("url_worker_max_bytes", ge=1024)
    url_max_redirects: int = setting("url_max_redirects", ge=0, le=20)
    cache_mb: int = setting("cache_mb", ge=0, le=1_000_000)
    triton_url: str | None = setting("triton_url")
    triton_metrics_url: str | None = setting("triton_metrics_url")
    triton_http_port: int = setting("triton_http_port", ge=1, le=65535)
    triton_shm_mb: int = setting("triton_shm_mb", ge=0, le=1_000_000)
    models: str | None = setting("models")
    model_idle_unload: float | None = setting("model_idle_unload", gt=0)
    max_loaded_models: int | None = setting("max_loaded_models", ge=1)

    @field_validator("triton_url", "triton_metrics_url")
    @classmethod
    def _check_host_port(cls, value: str | None) -> str | None:
        if value is None:
            return None
        bare = value.removeprefix("http://").rstrip("/")
        host, _, port = bare.rpartition(":")
        if "://" in bare or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"expected host:port (or http://host:port), got {value!r}")
        return bare

    @field_validator("served_model_name")
    @classmethod
    def _check_served_model_name(cls, value: str | None) -> str | None:
        if value is not None and not NAME.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a model name: letters, digits and . _ : / @ + - (at most 128, "
                "a letter or digit first), as in IEI_MODELS"
            )
        return value

    @model_validator(mode="after")
    def _check_limits_agree(self) -> ServerSettings:
        """Limits that contradict each other would refuse every large request: stop instead."""
        pairs = [
            ("max_client_batch_size", "max_concurrent_images", "inputs a request may carry",
             "images a worker may have in flight"),
            ("payload_limit", "body_worker_max_bytes", "bytes of one request body",
             "bytes of request bodies a worker may hold"),
            ("url_max_bytes", "url_request_max_bytes", "bytes of one URL",
             "bytes the URLs of one request may download"),
            ("url_request_max_bytes", "url_worker_max_bytes",
             "bytes the URLs of one request may download", "bytes a worker may hold"),
        ]  # fmt: skip
        for small, large, small_means, large_means in pairs:
            if getattr(self, small) > getattr(self, large):
                raise ValueError(
                    f"{SETTINGS[small].env}={getattr(self, small)} ({small_means}) is more than "
                    f"{SETTINGS[large].env}={getattr(self, large)} ({large_means})"
                )
        return self

    @model_validator(mode="after")
    def _check_models(self) -> ServerSettings:
        """IEI_MODELS parses, and is not given beside IMAGE_EMBEDDING_MODEL."""
        if self.models is None:
            return self
        if "embedding_model" in self.model_fields_set:
            raise ValueError(
                "IEI_MODELS and IMAGE_EMBEDDING_MODEL are both set: give the models in one of them"
            )
        try:
            served = parse_models(self.models)
        except ModelsError as exc:
            raise ValueError(str(exc)) from None
        others = {name for model in served[1:] for name in (model.name, *model.aliases)}
        if self.served_model_name in others:  # a request naming it would get the other model
            raise ValueError(
                f"IEI_SERVED_MODEL_NAME={self.served_model_name} (the default model's other name) "
                "is the name of another model in IEI_MODELS"
            )
        return self

    @model_validator(mode="after")
    def _check_max_loaded_models(self) -> ServerSettings:
        """IEI_MAX_LOADED_MODELS leaves room for the models that are always loaded and one more
        (the point of it): a limit they fill would refuse every model loaded on demand."""
        cap = self.max_loaded_models
        if cap is None or self.models is None:
            return self
        always = [m for m in self.served if m.pinned or self.model_idle_unload is None]
        why = "pinned" if self.model_idle_unload else "IEI_MODEL_IDLE_UNLOAD is unset"
        if len(always) > cap:
            raise ValueError(
                f"IEI_MAX_LOADED_MODELS={cap}, but {len(always)} models of IEI_MODELS are always "
                f"loaded ({why})"
            )
        if len(always) == cap < len(self.served):
            raise ValueError(
                f"IEI_MAX_LOADED_MODELS={cap} leaves no room for a model loaded on demand: "
                f"{cap} of IEI_MODELS are always loaded ({why})"
            )
        return self

    @cached_property
    def served(self) -> tuple[ServedModel, ...]:
        """The served models, the default first (IEI_MODELS, else IMAGE_EMBEDDING_MODEL)."""
        if self.models is None:
            return single_model(self.embedding_model, self.served_model_name)
        served = parse_models(self.models)
        if self.served_model_name:  # the default's other name, as in the one-model form
            first = served[0]
            aliases = (*first.aliases, self.served_model_name)
            served = (replace(first, aliases=aliases), *served[1:])
        return served

    @cached_property
    def model_in_use_seconds(self) -> float:
        """IEI_MAX_LOADED_MODELS: a model that ran an inference this recently is in use (a
        request that used it may still be running) and is not unloaded for another."""
        return max(IN_USE_SECONDS, self.request_timeout)

    @cached_property
    def default_model(self) -> ServedModel:
        return self.served[0]

    @cached_property
    def model_names(self) -> frozenset[str]:
        """Names a client may give as `model`: the id, its last part, the served name."""
        first = self.default_model
        return frozenset({first.name, *first.aliases})

    @cached_property
    def public_model_name(self) -> str:
        """The default model's name (IEI_SERVED_MODEL_NAME or the id in the one-model form)."""
        return self.default_model.name

    @cached_property
    def triton_endpoint(self) -> str:
        """host:port of Triton's HTTP endpoint, as tritonclient wants it."""
        return self.triton_url or f"127.0.0.1:{self.triton_http_port}"
