"""`clickvec.client`: what a consumer of clickvec's topics imports.

`decode_vector(value, key=None, *, registry=None)` reads any of the worker's output
encodings (json, f16, i8, Avro in Confluent framing) into one `Vector`, and returns None
for a tombstone.

`RedisLookup(url).get(user)` and `TopicLookup(bootstrap, topic).get(user)` give a user's
latest vector (`LatestVector`), from what `clickvec serve-redis` keeps in Redis or from a
vector topic (clickvec/client/lookup.py). They are imported on first use, so
`clickvec.client` needs neither redis-py (the `serve` extra) nor a Kafka client to import.
"""

from typing import Any

from clickvec.client.decode import Vector, decode_vector

__all__ = ["LatestVector", "RedisLookup", "TopicLookup", "Vector", "decode_vector"]
_LOOKUP = ("LatestVector", "RedisLookup", "TopicLookup")


def __getattr__(name: str) -> Any:
    if name in _LOOKUP:
        from clickvec.client import lookup

        return getattr(lookup, name)
    raise AttributeError(f"module 'clickvec.client' has no attribute {name!r}")
