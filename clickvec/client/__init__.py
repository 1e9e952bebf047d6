"""`clickvec.client`: what a consumer of clickvec's topics imports.

`decode_vector(value, key=None, *, registry=None)` reads any of the worker's output
encodings (json, f16, i8, Avro in Confluent framing) into one `Vector`, and returns None
for a tombstone.
"""

from clickvec.client.decode import Vector, decode_vector

__all__ = ["Vector", "decode_vector"]
