"""The wire contract: click events in (`events`), vector and dead-letter messages out
(`messages`), default topic names (`topics`), the schema files (`avro`, package data in
schemas/: Avro, JSON Schema and Protobuf) and the Schema Registry formats (`registry`).
`events`, `messages` and `topics` import only the standard library, numpy and orjson, so
every stage (synthetic data, trainer, worker, consumers) can use them; `avro`, `registry`
and `event_pb` need the `registry` extra when used.

Contract version: `CONTRACT_VERSION` (also in the schemas' namespace, io.clickvec.v1 /
clickvec.v1). Readers of every clickvec message ignore fields they do not know.

Changes that keep the version (every reader of this version keeps working):
- adding an optional field to a message (JSON: a new key; Avro: a new field appended at
  the end of the record, with a default; Protobuf: a new field number);
- adding an event type, a dead-letter reason, a vector encoding or an output format;
- adding a value to a field's documented range that readers already handle (e.g. a
  longer vector for a new model: `model_id` says which model wrote it).
Changes that need a new version (a new namespace and subject, published beside the old):
- removing, renaming or retyping a field, or making an optional field required;
- changing the meaning or unit of a field (e.g. `ts` from milliseconds to seconds);
- reordering Avro fields or reusing a Protobuf field number;
- changing the binary vector header (`_BIN_VERSION` in `messages`) or the key.
"""

CONTRACT_VERSION = 1
