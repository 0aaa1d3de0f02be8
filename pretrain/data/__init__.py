"""Data: the prepared-data format (`format`), prepare's seams (`sources`, `tokenize`,
`writer`), reading shards (`shards`), one source's global stream and its readers (`stream`),
weighted mixtures of sources (`mixture`) and the resumable, elastic token loader (`loader`)."""

from pretrain.data.format import DataError, Manifest, Shard, ShardError
from pretrain.data.loader import TokenLoader
from pretrain.data.mixture import Source
from pretrain.data.shards import read_manifest

__all__ = [
    "DataError",
    "Manifest",
    "Shard",
    "ShardError",
    "Source",
    "TokenLoader",
    "read_manifest",
]
