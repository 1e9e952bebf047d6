"""The consumers of the vector topic, one module per role:
  loop         `VectorTopicLoop`: consume, handle, publish, then commit (shared)
  alerts       `clickvec alerts`: the live per-user fraud scorer
  alerts_eval  offline evaluation of that scorer against synthetic labels
  recommend    `clickvec recommend`: live top-k items per vector
"""
