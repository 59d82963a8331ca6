"""The cache format: manifest, target containers and codecs (numpy only; the bottom floor)."""

from logitcache.format.codec import ArraySpec, TargetCodec, codec_from_dict
from logitcache.format.manifest import (
    FORMAT_VERSION,
    Coverage,
    FileRecord,
    Manifest,
    ShardRecord,
    SourceInfo,
    TargetsInfo,
)
from logitcache.format.sampled import SampledCodec
from logitcache.format.targets import SampledTargets, TopKTargets
from logitcache.format.topk import TopKCodec

__all__ = [
    "FORMAT_VERSION",
    "ArraySpec",
    "Coverage",
    "FileRecord",
    "Manifest",
    "SampledCodec",
    "SampledTargets",
    "ShardRecord",
    "SourceInfo",
    "TargetCodec",
    "TargetsInfo",
    "TopKCodec",
    "TopKTargets",
    "codec_from_dict",
]
