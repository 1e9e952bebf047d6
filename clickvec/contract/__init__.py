"""The wire contract: click events in (`events`), vector and dead-letter messages out
(`messages`), default topic names (`topics`). Imports only the standard library, numpy
and orjson, so every stage (synthetic data, trainer, worker, consumers) can use it."""
