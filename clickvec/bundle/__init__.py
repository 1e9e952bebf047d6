"""Model bundles, one module per role:
  format   file names, the step graph's input/output names and shapes, hashing, the seal
  reader   `load_bundle`: check every file against the manifest, open a `Bundle`
  runtime  `StepSession`: the ONNX Runtime session of the step graph, CUDA or CPU
  signing  optional Ed25519 signature over the manifest (`--sign` / `--trust`; needs `cryptography`)
The writer is on the export side (`clickvec.export.writer`).

Imports numpy, onnxruntime and clickvec only — never torch — because the stream worker
(and its serving image) uses it.

A bundle directory holds:
  manifest.json           format version, model id, dims, feature spec, names, metrics,
                          parity figures, sha256 of every file, and its own digest
  encoder.onnx            the step graph (float32); optional encoder.fp16.onnx / encoder.int8.onnx
  vocab.json              FeatureSpec.to_json()
  item_embeddings.npy     float32 (n_items, item_dim)   \
  item_bias.npy           float32 (n_items,)             } score = (W z + b) . emb + bias
  item_proj_weight.npy    float32 (item_dim, z_dim) W    /
  item_proj_bias.npy      float32 (item_dim,)       b   /
  signature.json          optional: key id and Ed25519 signature of manifest.json (not listed in it)

Usage:
    from clickvec.bundle.reader import load_bundle
    bundle = load_bundle("models/NAME")          # verifies, picks CUDA or CPU, warms up
    h, c = bundle.zero_state(B)
    h, c, z_seq, z_last, surprise = bundle.step(items, etypes, gaps, lengths, h, c)
"""
