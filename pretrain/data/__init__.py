"""Data: prepared shards (`shards`) and the resumable, elastic token loader (`loader`)."""

from pretrain.data.loader import TokenLoader
from pretrain.data.shards import DataError, Manifest, Shard, ShardError, read_manifest

__all__ = ["DataError", "Manifest", "Shard", "ShardError", "TokenLoader", "read_manifest"]
