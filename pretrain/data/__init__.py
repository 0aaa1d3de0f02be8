"""Data: the prepared-data format (`format`), prepare's seams (`sources`, `tokenize`,
`writer`), reading shards (`shards`) and the resumable, elastic token loader (`loader`)."""

from pretrain.data.format import DataError, Manifest, Shard, ShardError
from pretrain.data.loader import TokenLoader
from pretrain.data.shards import read_manifest

__all__ = ["DataError", "Manifest", "Shard", "ShardError", "TokenLoader", "read_manifest"]
