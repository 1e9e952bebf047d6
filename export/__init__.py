"""Training run -> verified model bundle (`clickvec export`), one module per role:
  graph     the ONNX step graph, built from an `Encoder`'s weights
  parity    the graph against PyTorch, and streaming against offline encoding
  variants  float16 / int8 encoders, kept only when close to float32
  writer    the bundle directory: files, hashes, sealed manifest
  cli       the command line
"""
