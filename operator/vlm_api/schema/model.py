"""The VLM a run trains: its LLM, vision encoder, projector and tokenizer."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from .common import URI_PATTERN, Model, cel, free_form, secret_ref


class ModelPart(Model):
    """A pretrained component loaded from `path`, or built from scratch from `config`."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("has(self.path) != has(self.config)", "set exactly one of path or config"),
                cel("!has(self.credentialsSecret) || has(self.path)", "credentialsSecret needs a path to read",
                    ".credentialsSecret"),
            ]
        }
    )
    path: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        pattern=URI_PATTERN,
        description="Directory that transformers' from_pretrained loads (local, file:// or s3://, downloaded first).",
    )
    credentials_secret: str | None = secret_ref(
        "that reads this s3:// path; default: checkpoint.credentialsSecret, else the pod's ambient identity (service account, instance role). The LLM's also reads the tokenizer."
    )
    config: dict[str, Any] | None = Field(
        None, **free_form("Inline transformers config (must contain model_type); the part starts from random weights.")
    )

    @model_validator(mode="after")
    def _one_of(self) -> "ModelPart":
        if (self.path is None) == (self.config is None):
            raise ValueError("set exactly one of path or config")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("config.model_type is required (e.g. llama, siglip_vision_model)")
        if self.credentials_secret is not None and self.path is None:
            raise ValueError("credentialsSecret needs a path to read (a part built from config reads nothing)")
        return self


class Projector(Model):
    """Maps vision-encoder features into the LLM's embedding space."""

    type: Literal["mlp2x_gelu", "linear"] = Field(
        "mlp2x_gelu", description="mlp2x_gelu (LLaVA-1.5: Linear-GELU-Linear) or linear."
    )


class Tokenizer(Model):
    """The tokenizer; the image placeholder token is added when missing."""

    path: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        pattern=URI_PATTERN,
        description="Directory AutoTokenizer.from_pretrained loads (local or s3://). Defaults to the LLM's path.",
    )
    builtin: Literal["bytes"] | None = Field(
        None,
        description="A tokenizer generated in-process: 'bytes' is byte-level (256 tokens + specials); "
        "for tests, demos and inline-config LLMs, where nothing may be downloaded.",
    )
    image_token: str = Field(
        "<image>", min_length=1, max_length=64, description="Placeholder token that image embeddings replace."
    )


class ModelSpec(Model):
    """The VLM: an LLM, a vision encoder and a projector between them."""

    llm: ModelPart = Field(description="The causal language model (any AutoModelForCausalLM).")
    vision_encoder: ModelPart | None = Field(
        None, description="Vision encoder (SigLIP or CLIP vision model). Required when any stage uses image data."
    )
    projector: Projector = Field(default_factory=Projector, description="Vision-to-LLM projector.")
    tokenizer: Tokenizer = Field(default_factory=Tokenizer, description="Tokenizer (defaults to the LLM's).")

    @model_validator(mode="after")
    def _tokenizer_source(self) -> "ModelSpec":
        if self.tokenizer.path is None and self.tokenizer.builtin is None and self.llm.path is None:
            raise ValueError("tokenizer: set tokenizer.path or tokenizer.builtin when the LLM is built from config")
        return self
