"""`clickvec export --surprise`: the approximate surprise against the exact one, the mode
in the manifest, the default bundle unchanged, a bad value refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clickvec.bundle.reader import load_bundle
from clickvec.bundle.runtime import RuntimeConfig, StepSession
from clickvec.export import cli as export_cli
from clickvec.export.graph import build_step_graph
from clickvec.export.parity import pack, random_sequences
from clickvec.export.surprise import (
    AUTO_EXACT_MAX_ITEMS,
    SurpriseModeError,
    parse_mode,
    resolve,
    spearman,
)
from clickvec.features import FeatureSpec
from clickvec.training.checkpoint import save_checkpoint
from clickvec.training.model import Encoder, ModelConfig

N_ITEMS = 3000
APPROX = "approx:head=128,clusters=64,rank=2"


@pytest.fixture(scope="module")
def trained_like() -> tuple[FeatureSpec, Encoder]:
    """A small encoder with the item tables a trained one has: biases that fall with
    popularity rank (Zipf, as the vocabulary orders items) and embeddings around topics."""
    spec = FeatureSpec(items=tuple(f"item-{i}" for i in range(N_ITEMS)))
    torch.manual_seed(0)
    model = Encoder(ModelConfig(spec.n_items, spec.n_event_types, spec.n_gap_buckets, item_dim=16, type_dim=4,
                                gap_dim=4, hidden=32, z_dim=8)).eval()
    rng = np.random.default_rng(0)
    n = spec.n_items
    emb = rng.normal(size=(40, 16))[rng.integers(0, 40, n)] + 0.4 * rng.normal(size=(n, 16))
    emb[0] = 0.0  # padding row
    with torch.no_grad():
        model.item_emb.weight.copy_(torch.tensor(emb, dtype=torch.float32))
        model.item_bias.copy_(torch.tensor(-np.log(np.arange(1, n + 1)), dtype=torch.float32))
        model.item_proj.weight.mul_(3.0)  # queries as long as a trained model's
    return spec, model


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, trained_like) -> dict[str, Path]:
    spec, model = trained_like
    root = tmp_path_factory.mktemp("surprise")
    save_checkpoint(root / "run" / "best.pt", model, spec, {"purpose": "test"})
    out = {}
    for name, args in (("default", []), ("approx", ["--surprise", APPROX])):
        out[name] = root / name
        assert export_cli.main([str(root / "run"), "--out", str(out[name]), *args]) == 0
    return out


def test_approx_surprise_close_to_exact(bundles, trained_like):
    """Vectors and states are the exact graph's; only log Z of the item term is estimated,
    and per event its error stays within the estimator's bound max_c |q| R_c (each tail
    cluster's estimate and true log-sum both lie in [Jensen, Jensen + |q| R_c]); over
    events the ranking is kept (what an alerting threshold reads)."""
    spec, model = trained_like
    approx = load_bundle(bundles["approx"], providers="cpu")
    meta = approx.manifest["surprise"]
    assert meta["mode"] == "approx" and meta["label"] == APPROX and meta["n_items"] == spec.n_items
    assert meta["error_vs_exact"]["state_and_vector_max_abs_diff"] == 0.0
    assert meta["error_vs_exact"]["spearman"] > 0.99
    exact = StepSession(build_step_graph(model).SerializeToString(), RuntimeConfig(providers="cpu"))
    seqs = random_sequences(np.random.default_rng(3), spec.n_items, spec.n_event_types, spec.n_gap_buckets, 24, 20)
    items, types, gaps, lengths = pack(seqs)
    zero = np.zeros((model.cfg.layers, len(seqs), model.cfg.hidden), np.float32)
    ex = exact.run(items, types, gaps, lengths, zero, zero)
    ap = approx.step(items, types, gaps, lengths, zero, zero)
    for a, b in zip(ex[:4], ap[:4], strict=True):
        np.testing.assert_array_equal(a, b)
    valid = np.arange(items.shape[0])[:, None] < lengths[None, :]
    err = np.abs(ap[4] - ex[4])[valid]
    # the bound, from the query of every event (z before it, through item_proj)
    with torch.no_grad():
        z_prev = np.concatenate([np.asarray(model.z(torch.tensor(zero[-1])))[None], ex[2][:-1]])
        q = z_prev @ model.item_proj.weight.numpy().T + model.item_proj.bias.numpy()
    from clickvec.export.surprise import tail_tables

    radius = tail_tables(model.item_emb.weight.detach().numpy(), model.item_bias.detach().numpy(),
                         parse_mode(APPROX))["sa_radius"]
    bound = (np.linalg.norm(q, axis=-1) * radius.max())[valid]
    assert np.all(err <= bound + 1e-4)
    assert err.mean() < 0.02 * np.abs(ex[4][valid]).mean(), (err.mean(), np.abs(ex[4][valid]).mean())
    assert spearman(ex[4][valid], ap[4][valid]) > 0.99


def test_default_export_is_exact_and_unchanged(bundles, trained_like):
    """Without --surprise a catalogue this size is exported exactly as before the option:
    the same encoder bytes, the mode recorded as exact."""
    _, model = trained_like
    b = load_bundle(bundles["default"], providers="cpu")
    assert b.manifest["surprise"]["mode"] == "exact"
    assert (bundles["default"] / "encoder.onnx").read_bytes() == build_step_graph(model).SerializeToString()
    assert resolve(parse_mode("auto"), AUTO_EXACT_MAX_ITEMS).kind == "exact"
    assert resolve(parse_mode("auto"), AUTO_EXACT_MAX_ITEMS + 1).kind == "approx"
    assert resolve(parse_mode("approx:head=10,clusters=10"), 20).kind == "exact"  # nothing left to estimate


@pytest.mark.parametrize("value", ["fast", "approx:head=x", "exact:head=3", "approx:size=3"])
def test_bad_surprise_value_is_one_line(value, tmp_path, capsys):
    assert export_cli.main([str(tmp_path / "run"), "--out", str(tmp_path / "m"), "--surprise", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clickvec export: --surprise"), err
    with pytest.raises(SurpriseModeError):
        parse_mode(value)
