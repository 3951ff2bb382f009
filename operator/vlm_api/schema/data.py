"""The data a run declares: named sources of webdataset shards and the sequence layout."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..quantities import MAX_SHARDS, count_shards
from .common import DATA_URI_PATTERN, NAME_PATTERN, Model, list_map, secret_ref


class DataSource(Model):
    """A named stream of webdataset tar shards of one modality."""

    name: str = Field(max_length=63, pattern=NAME_PATTERN, description="Name that stage mixtures refer to.")
    modality: Literal["text", "image-text", "interleaved"] = Field(
        description="text (<key>.txt), image-text (<key>.png|jpg|webp + <key>.txt caption) or "
        "interleaved (<key>.json segments referencing images of the same sample)."
    )
    uri: str = Field(
        max_length=2048,
        pattern=DATA_URI_PATTERN,
        description="Shards: s3://, pvc://CLAIM/path (the claim mounted read-only), file:// or a local path, with {00000..00099} brace ranges "
        f"(at most {MAX_SHARDS:,} shards per URI); no user:password@ or query string.",
    )
    validation_uri: str | None = Field(
        None,
        max_length=2048,
        pattern=DATA_URI_PATTERN,
        description="Held-out shards for per-modality validation loss (same format).",
    )
    credentials_secret: str | None = secret_ref(
        "that reads this source's s3:// shards; default: data.credentialsSecret."
    )

    @field_validator("uri", "validation_uri")
    @classmethod
    def _braces(cls, value: str | None) -> str | None:
        if value is not None:
            count_shards(value)  # counted, never expanded: validation stays cheap whatever the range
        return value


class DataSpec(Model):
    """Declared data sources and sequence layout."""

    sources: list[DataSource] = Field(
        min_length=1, max_length=64, description="All sources any stage may mix (names unique).",
        json_schema_extra=list_map(),
    )
    seq_length: int = Field(2048, ge=16, le=1_048_576, description="Tokens per training sequence (image tokens included).")
    credentials_secret: str | None = secret_ref(
        "that reads s3:// sources without their own; default: checkpoint.credentialsSecret, else the pod's ambient identity (service account, instance role)."
    )
    packing: bool = Field(
        True,
        description="Pack several whole samples into each sequence (attention and positions isolated per sample; "
        "tokens and globalBatchTokens count real tokens). false: one sample per padded sequence (ablations).",
    )

    @model_validator(mode="after")
    def _unique(self) -> "DataSpec":
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sources: duplicate names {dup}")
        return self

    def source(self, name: str) -> DataSource:
        return next(s for s in self.sources if s.name == name)
