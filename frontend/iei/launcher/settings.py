"""What `iei serve` and `iei triton` read: the frontend's settings (`iei serve` runs it and checks
them before anything starts), the model's (checked here so a typo stops start-up with the
variable's name, not a Triton failure), and the launcher's own."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import ValidationInfo, field_validator, model_validator

from ..server.settings import ServerSettings
from ..settings import MAX_WORKERS, auto_or_count, setting
from .addresses import check_bind, check_listen_address, dial_endpoint, may_share_port
from .repository import (
    ModelPlan,
    available_cores,
    max_batch_size,
    render_model_repository,
    shipped_model_repository,
)


class LauncherSettings(ServerSettings):
    bind: str = setting("bind")
    workers: str = setting("workers")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = setting("dtype")
    engine: Literal["auto", "torch", "onnxruntime", "openvino"] = setting("engine")
    engine_cache: Path | None = setting("engine_cache")
    pooling: Literal["auto", "mean", "cls", "pooler"] = setting("pooling")
    forward_batch_size: str = setting("forward_batch_size")
    forward_threads: str = setting("forward_threads")
    jpeg_draft: bool = setting("jpeg_draft")
    fused_preprocess: bool = setting("fused_preprocess")
    jpeg_decoder: Literal["auto", "pil", "torchvision", "nvimagecodec"] = setting("jpeg_decoder")
    cuda_graphs: bool = setting("cuda_graphs")
    triton_layout: Literal["auto", "single", "split"] = setting("triton_layout")
    preprocess_instances: int | None = setting("preprocess_instances", ge=1, le=256)
    decode_pixel_budget: int = setting("decode_pixel_budget", ge=1)
    triton_host: str = setting("triton_host")
    triton_grpc_port: int = setting("triton_grpc_port", ge=1, le=65535)
    triton_metrics_port: int = setting("triton_metrics_port", ge=1, le=65535)
    triton_instances: int | None = setting("triton_instances", ge=1, le=64)
    triton_max_queue_size: int = setting("triton_max_queue_size", ge=1)
    model_repository: Path | None = setting("model_repository")
    startup_timeout: float = setting("startup_timeout", gt=0)

    @field_validator("bind")
    @classmethod
    def _check_bind(cls, value: str) -> str:
        return check_bind(value)

    @field_validator("triton_host")
    @classmethod
    def _check_triton_host(cls, value: str) -> str:
        return check_listen_address(value)

    @field_validator("workers", "forward_batch_size", "forward_threads", mode="before")
    @classmethod
    def _count_as_text(cls, value: object) -> object:
        """Code may pass a count as a number (`LauncherSettings(workers=4)`); these fields hold
        `auto` or a count as text."""
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("workers", "forward_batch_size", "forward_threads")
    @classmethod
    def _check_auto_or_count(cls, value: str, info: ValidationInfo) -> str:
        return auto_or_count(value, MAX_WORKERS if info.field_name == "workers" else None)

    @model_validator(mode="after")
    def _check_budget_holds_an_image(self) -> LauncherSettings:
        if self.decode_pixel_budget < self.max_image_pixels:
            raise ValueError(
                f"IEI_DECODE_PIXEL_BUDGET={self.decode_pixel_budget} is less than "
                f"IEI_MAX_IMAGE_PIXELS={self.max_image_pixels}: the largest image would not fit"
            )
        return self

    @model_validator(mode="after")
    def _check_forward_counts(self) -> LauncherSettings:
        """As the model checks them when it loads (iei_runtime/settings.py): a pass of more
        images than an execution holds, or on more threads than there are cores, is refused
        here in one line, not by the model's allocator or its load."""
        limits = (
            ("IEI_FORWARD_BATCH_SIZE", self.forward_batch_size, max_batch_size, "the model's "
             "max_batch_size"),
            ("IEI_FORWARD_THREADS", self.forward_threads, available_cores, "the cores here"),
        )  # fmt: skip
        for name, value, most_of, why in limits:
            if value != "auto" and int(value) > (most := most_of(self.repository)):
                raise ValueError(
                    f"{name}={value}: expected auto or a count from 1 to {most} ({why})"
                )
        return self

    @model_validator(mode="after")
    def _check_tritons_ports_differ(self) -> LauncherSettings:
        """Triton binds its ports only once the model has loaded: a clash found then cost the
        whole load (minutes) and named no variable."""
        if self.triton_url is None and (clash := self.tritons_port_clash()):
            raise ValueError(clash)
        return self

    def tritons_port_clash(self) -> str | None:
        """Why the Triton that `iei serve` or `iei triton` starts could not bind, or None."""
        ports = self.tritons_ports()
        if len(set(ports.values())) < len(ports):
            shown = ", ".join(f"{name}={port}" for name, port in ports.items())
            return f"Triton's ports must differ: {shown}"
        return None

    def tritons_ports(self) -> dict[str, int]:
        return {
            "IEI_TRITON_HTTP_PORT": self.triton_http_port,
            "IEI_TRITON_GRPC_PORT": self.triton_grpc_port,
            "IEI_TRITON_METRICS_PORT": self.triton_metrics_port,
        }

    def frontend_port_clash(self) -> str | None:
        """Why `iei serve`'s frontend could not bind beside its own Triton, or None."""
        for name, port in self.tritons_ports().items():
            if port == self.port and may_share_port(self.host, self.triton_host):
                return f"IEI_BIND={self.bind} takes Triton's port ({name}={port})"
        return None

    @cached_property
    def host(self) -> str:
        return self.bind.rpartition(":")[0].strip("[]")

    @cached_property
    def port(self) -> int:
        return int(self.bind.rpartition(":")[2])

    @cached_property
    def triton_endpoint(self) -> str:
        """host:port of Triton's HTTP endpoint: IEI_TRITON_URL, else the Triton that `iei serve`
        starts, dialled where it is bound (loopback for a wildcard, IPv6 in brackets)."""
        return self.triton_url or dial_endpoint(self.triton_host, self.triton_http_port)

    @cached_property
    def triton_metrics_endpoint(self) -> str | None:
        """host:port of the metrics endpoint of the Triton that `iei serve` starts (None with
        IEI_TRITON_URL: someone else's, which IEI_TRITON_METRICS_URL may name)."""
        if self.triton_url:
            return None
        return dial_endpoint(self.triton_host, self.triton_metrics_port)

    @cached_property
    def repository(self) -> Path:
        """The model repository Triton loads: IEI_MODEL_REPOSITORY, else the one IEI ships."""
        return self.model_repository or shipped_model_repository()

    def render(
        self,
        target: Path,
        gpus: int,
        layout: str = "single",
        models: Sequence[ModelPlan] | None = None,
    ) -> Path:
        """The model repository rendered for this machine and these settings, in `target`."""
        return render_model_repository(
            self.repository,
            target,
            gpus=gpus,
            layout=layout,
            models=models,
            instances=self.triton_instances,
            preprocess_instances=self.preprocess_instances,
            request_timeout=self.request_timeout,
            max_queue_size=self.triton_max_queue_size,
            forward_batch_size=(
                None if self.forward_batch_size == "auto" else int(self.forward_batch_size)
            ),
        )
