"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

EXAMPLE_IMAGE = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)


class EmbedRequest(BaseModel):
    """`POST /embed`, as in text-embeddings-inference, with images instead of text."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"inputs": [EXAMPLE_IMAGE], "normalize": True}]},
    )

    inputs: StrictStr | list[StrictStr] = Field(
        description="One image or a list: base64 of the file, or a data:image/...;base64, URI."
    )
    normalize: StrictBool = Field(True, description="Scale each vector to unit L2 norm.")

    @property
    def input_list(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else self.inputs
