"""Export: the step graph equals the PyTorch model, streaming equals offline encoding,
bundles are tamper-evident, the loader never needs torch, parity failures are fatal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from clickvec.bundle.format import ENCODER_FILES, MANIFEST, STEP_INPUTS, STEP_OUTPUTS, BundleError
from clickvec.bundle.reader import bundle_files, load_bundle
from clickvec.export import cli as export_cli
from clickvec.export.graph import build_step_graph, encoder_weights
from clickvec.export.parity import ParityError, check_parity, random_sequences, streamed
from clickvec.export.writer import export_bundle
from clickvec.features import FeatureSpec
from clickvec.training.checkpoint import save_checkpoint
from clickvec.training.model import Encoder, ModelConfig

REPO = Path(__file__).resolve().parents[1]


def _model(spec: FeatureSpec, seed: int = 0, **kw) -> Encoder:
    torch.manual_seed(seed)
    cfg = dict(item_dim=16, type_dim=4, gap_dim=4, hidden=32, z_dim=8, layers=2)
    cfg.update(kw)
    model = Encoder(ModelConfig(spec.n_items, spec.n_event_types, spec.n_gap_buckets, **cfg))
    with torch.no_grad():  # livelier than the default init so states differ visibly
        model.item_emb.weight.mul_(10.0)
    return model.eval()


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return FeatureSpec(items=tuple(f"item-{i}" for i in range(300)))


@pytest.fixture(scope="module")
def sequences(spec: FeatureSpec) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return random_sequences(rng, spec.n_items, spec.n_event_types, spec.n_gap_buckets, 40, 30)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, spec: FeatureSpec) -> Path:
    d = tmp_path_factory.mktemp("run")
    save_checkpoint(d / "best.pt", _model(spec), spec, {"lr": 0.001}, {"hr@10": 0.42}, step=10, epoch=1)
    return d


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, run_dir: Path, sequences: list[np.ndarray]) -> Path:
    out = tmp_path_factory.mktemp("models") / "m"
    seq_file = run_dir / "seqs.npz"
    np.savez(seq_file, *sequences)
    rc = export_cli.main([str(run_dir), "--out", str(out), "--fp16", "--int8", "--sequences", str(seq_file)])
    assert rc == 0
    return out


# ------------------------------------------------------------------------- parity


@pytest.mark.parametrize("layers,vae", [(1, False), (2, False), (1, True)])
def test_graph_equals_torch_and_streaming_equals_offline(spec, sequences, layers, vae):
    model = _model(spec, layers=layers, vae=vae)
    report = check_parity(model, build_step_graph(model).SerializeToString(), sequences=sequences[:16])
    assert report["passed"] and report["max_abs_diff_overall"] <= 1e-5
    for group in ("torch_equal", "torch_ragged", "torch_real", "stream_random", "stream_real"):
        assert any(k.startswith(group + ".") for k in report["max_abs_diff"]), group
    assert report["cases"]["stream_random_event_by_event_events"] > 100


def test_default_size_graph_parity():
    spec = FeatureSpec(items=tuple(f"i{k}" for k in range(5000)))
    torch.manual_seed(1)
    model = Encoder(ModelConfig(spec.n_items, spec.n_event_types, spec.n_gap_buckets)).eval()
    report = check_parity(model, build_step_graph(model).SerializeToString(), n_users=12, max_len=20)
    assert report["passed"]


def test_bundle_stream_equals_offline(bundle_dir, sequences):
    """Through the loader: random chunking, users interleaved, mixed lengths per batch."""
    bundle = load_bundle(bundle_dir, providers="cpu")
    for seed in range(3):
        got, z_last_diff = streamed(bundle.session, sequences, np.random.default_rng(seed), 5, 16)
        assert z_last_diff <= 1e-5
        for seq, g in zip(sequences, got, strict=True):
            np.testing.assert_allclose(g.z, bundle.encode_offline(seq), atol=1e-5, rtol=0)


def test_io_binding_path_matches_plain_run(bundle_dir, sequences):
    plain = load_bundle(bundle_dir, providers="cpu", io_binding=False)
    bound = load_bundle(bundle_dir, providers="cpu", io_binding=True)
    assert bound.session.io_binding and not plain.session.io_binding
    seq = sequences[0]
    np.testing.assert_array_equal(bound.encode_offline(seq), plain.encode_offline(seq))
    h, c = plain.zero_state(3)
    x = np.ones((2, 3), np.int64)
    lengths = np.array([2, 1, 2], np.int32)
    for a, b in zip(plain.step(x, x, x, lengths, h, c), bound.step(x, x, x, lengths, h, c), strict=True):
        np.testing.assert_array_equal(a, b)


def test_parity_failure_is_fatal(spec, sequences):
    model = _model(spec)
    w = encoder_weights(model)
    w["lstm1_R"][0, 5, 3] += 0.05  # one recurrent weight of the top layer
    bad = build_step_graph(model, weights=w).SerializeToString()
    with pytest.raises(ParityError) as err:
        check_parity(model, bad, sequences=sequences[:8])
    assert len(err.value.mismatches) > 1 and err.value.max_diff > 1e-5
    assert "torch_ragged.h" in str(err.value)


def test_export_writes_nothing_when_parity_fails(run_dir, tmp_path, monkeypatch):
    import clickvec.export.writer as eb

    def corrupt(model, weight_dtype="float32", weights=None):
        w = encoder_weights(model)
        w["z_head_b"] = w["z_head_b"] + 1e-3
        return build_step_graph(model, weight_dtype, w)

    monkeypatch.setattr(eb, "build_step_graph", corrupt)
    with pytest.raises(ParityError):
        export_bundle(run_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no half-written temporary directory either


# ------------------------------------------------------------------------- bundle


def test_manifest_contents(bundle_dir):
    m = json.loads((bundle_dir / MANIFEST).read_text())
    assert m["bundle_format"] == 1 and len(m["model_id"]) == 64
    assert m["dims"] == {"layers": 2, "hidden": 32, "z_dim": 8, "item_dim": 16, "type_dim": 4, "gap_dim": 4,
                         "n_items": 302, "n_event_types": 7, "n_gap_buckets": 24}
    assert m["graph"]["inputs"] == list(STEP_INPUTS) and m["graph"]["outputs"] == list(STEP_OUTPUTS)
    assert m["graph"]["opset"] >= 17
    assert m["training"]["metrics"] == {"hr@10": 0.42} and m["training"]["step"] == 10
    assert m["parity"]["passed"] and m["parity"]["max_abs_diff_overall"] <= 1e-5
    assert set(m["variants"]) == {"fp32", "fp16", "int8"}
    for v in ("fp16", "int8"):
        assert m["variants"][v]["cosine_to_fp32"]["min"] >= 0.99
        assert "change" in m["variants"][v]["hr@10"]
    on_disk = {p.name for p in bundle_dir.iterdir()} - {MANIFEST}
    assert set(m["files"]) == on_disk
    assert len({m["variants"][v]["model_id"] for v in m["variants"]}) == 3


def test_loader_api(bundle_dir, spec):
    b = load_bundle(bundle_dir, providers="auto", intra_op_threads=1)
    assert b.spec == spec and (b.layers, b.hidden, b.z_dim) == (2, 32, 8)
    assert b.model_id == b.manifest["model_id"]
    assert b.providers[0] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    h, c = b.zero_state(4)
    assert h.shape == (2, 4, 32) and h.dtype == np.float32
    x = np.full((3, 4), 2, np.int64)
    h2, c2, z_seq, z_last, s = b.step(x, x, x, np.array([3, 1, 2, 3], np.int32), h, c)
    assert z_seq.shape == (3, 4, 8) and z_last.shape == (4, 8) and s.shape == (3, 4) and h2.shape == h.shape
    np.testing.assert_allclose(z_last[1], z_seq[0, 1], atol=1e-6)
    assert b.item_embeddings.shape == (302, 16) and b.score_items(z_last).shape == (4, 302)
    with pytest.raises(ValueError, match="lengths"):
        b.step(x, x, x, np.array([4, 1, 1, 1], np.int32), h, c)
    with pytest.raises(ValueError, match="h and c"):
        b.step(x, x, x, np.array([1, 1, 1, 1], np.int32), h[:, :3], c[:, :3])
    for v in ("fp16", "int8"):
        vb = load_bundle(bundle_dir, providers="cpu", variant=v)
        assert vb.model_id != b.model_id
        seq = np.array([[2, 2, 1], [3, 2, 5], [4, 3, 9]], np.int64)
        z, zr = vb.encode_offline(seq), b.encode_offline(seq)
        cos = (z * zr).sum(1) / np.linalg.norm(z, axis=1) / np.linalg.norm(zr, axis=1)
        assert cos.min() > 0.99


def test_export_is_deterministic(run_dir, bundle_dir, tmp_path):
    m = export_bundle(run_dir, tmp_path / "again")
    assert m["model_id"] == json.loads((bundle_dir / MANIFEST).read_text())["model_id"]
    with pytest.raises(Exception, match="already exists"):
        export_bundle(run_dir, tmp_path / "again")


def test_every_flipped_byte_is_refused(bundle_dir, tmp_path):
    files = list(bundle_files(bundle_dir))
    assert len(files) == 9  # manifest, 3 encoders, vocab, 4 arrays
    for f in files:
        copy = tmp_path / f.name.replace(".", "_")
        shutil.copytree(bundle_dir, copy)
        target = copy / f.name
        data = bytearray(target.read_bytes())
        for pos in (len(data) // 2, len(data) - 2):
            flipped = bytearray(data)
            flipped[pos] ^= 0x01  # one bit: keeps JSON/ONNX parseable more often than 0xFF
            target.write_bytes(bytes(flipped))
            with pytest.raises(BundleError):
                load_bundle(copy, providers="cpu", warmup=False)
        target.unlink()
        with pytest.raises(BundleError, match="missing"):
            load_bundle(copy, providers="cpu", warmup=False)


def test_edited_manifest_value_is_refused(bundle_dir, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    m = json.loads((copy / MANIFEST).read_text())
    m["parity"]["max_abs_diff_overall"] = 0.0  # still valid JSON, still canonical form
    from clickvec.bundle.format import canonical_json

    (copy / MANIFEST).write_bytes(canonical_json(m))
    with pytest.raises(BundleError, match="modified"):
        load_bundle(copy, providers="cpu")


def test_refused_variant_is_not_written(run_dir, tmp_path):
    out = tmp_path / "strict"
    m = export_bundle(run_dir, out, int8=True, min_cosine=1.000001)
    assert "int8" in m["refused_variants"] and "int8" not in m["variants"]
    assert not (out / ENCODER_FILES["int8"]).exists()
    with pytest.raises(BundleError, match="int8"):
        load_bundle(out, providers="cpu", variant="int8")
    rc = export_cli.main([str(run_dir), "--out", str(tmp_path / "cli"), "--int8", "--min-cosine", "1.000001"])
    assert rc == 3


def test_loader_runs_without_torch(bundle_dir, sequences):
    """The stream imports clickvec.bundle in an image without torch."""
    np.save(bundle_dir.parent / "seq.npy", sequences[0])
    script = textwrap.dedent(
        f"""
        import sys
        attempts = []
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    attempts.append(name)
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, NoTorch())
        import numpy as np
        from clickvec.bundle.reader import load_bundle
        b = load_bundle({str(bundle_dir)!r}, providers="auto")
        z = b.encode_offline(np.load({str(bundle_dir.parent / "seq.npy")!r}))
        h, c = b.zero_state(2)
        x = np.ones((1, 2), np.int64)
        out = b.step(x, x, x, np.ones(2, np.int32), h, c)
        loaded = [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
        print("OK", z.shape, attempts, loaded)
        assert not attempts and not loaded
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"OK ({len(sequences[0])}, 8) [] []" in r.stdout


def heavy_imports_of_help(module: str) -> list[str]:
    """The torch, onnx and training modules a fresh interpreter holds after importing the
    command `module` and asking it for `--help`."""
    script = textwrap.dedent(
        f"""
        import json, sys
        import {module} as command
        try:
            command.main(["--help"])
        except SystemExit:
            pass
        heavy = [m for m in sys.modules
                 if m.split(".")[0] in ("torch", "onnx") or m.startswith("clickvec.training")]
        print(json.dumps(sorted(heavy)))
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_export_help_imports_neither_torch_nor_onnx():
    """`clickvec export --help` must not pay for torch and onnx (seconds of imports)."""
    assert heavy_imports_of_help("clickvec.export.cli") == []


def test_surprise_scores_item_and_event_type(spec):
    """surprise = -log p(item_t | z_{t-1}) - log p(event_type_t | z_{t-1}) in the torch
    reference; the graph's parity with it is checked above."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = Encoder(ModelConfig(spec.n_items, spec.n_event_types, spec.n_gap_buckets, item_dim=8,
                                type_dim=4, gap_dim=4, hidden=16, z_dim=8)).eval()
    item = torch.tensor([[3, 4], [5, 3], [3, 6]])
    etype = torch.tensor([[2, 3], [4, 2], [6, 6]])
    gap = torch.ones_like(item)
    h0, c0 = model.zero_state(2)
    _, _, z_seq, surprise = model.step(item, etype, gap, h0, c0)
    z_prev = torch.cat([model.z(h0[-1]).unsqueeze(0), z_seq[:-1]])
    want = -(F.log_softmax(model.item_logits(z_prev), -1).gather(-1, item[..., None])[..., 0]
             + F.log_softmax(model.type_head(z_prev), -1).gather(-1, etype[..., None])[..., 0])
    assert torch.allclose(surprise, want, atol=1e-6)
    # Same item, another event type at t = 0: the surprise moves by the type term alone.
    _, _, _, other = model.step(item, torch.tensor([[3, 2], [4, 2], [6, 6]]), gap, h0, c0)
    lt = F.log_softmax(model.type_head(model.z(h0[-1])), -1)
    assert torch.allclose(other[0, 0] - surprise[0, 0], lt[0, 2] - lt[0, 3], atol=1e-6)
