"""`clickvec export runs/NAME --out models/NAME [--fp16] [--int8] [--sign KEY]`: a verified
model bundle. `clickvec export keygen --out DIR` makes a signing key pair
(clickvec/bundle/signing.py)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from clickvec.errors import ClickvecError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportConfig:
    run: str
    out: str
    fp16: bool
    int8: bool
    sequences: str | None
    min_cosine: float
    seed: int
    force: bool
    sign: str | None = None
    surprise: str = "auto"


def parse_args(argv: list[str]) -> ExportConfig:
    from clickvec.export.surprise import AUTO_EXACT_MAX_ITEMS
    from clickvec.export.variants import MIN_COSINE

    p = argparse.ArgumentParser(prog="clickvec export", description=__doc__)
    p.add_argument("run", help="training run directory (best.pt, else last.pt) or a .pt checkpoint")
    p.add_argument("--out", required=True, help="bundle directory to write (e.g. models/NAME)")
    p.add_argument("--fp16", action="store_true", help="also write encoder.fp16.onnx (float16 weights)")
    p.add_argument("--int8", action="store_true", help="also write encoder.int8.onnx (dynamic int8)")
    p.add_argument("--sequences", help=".npz of encoded user sequences (n, 3) for parity and HR@10 checks")
    p.add_argument("--min-cosine", type=float, default=MIN_COSINE,
                   help=f"refuse a fp16/int8 encoder whose vectors fall below this cosine to float32 (default {MIN_COSINE})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random parity sequences")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--sign", metavar="KEYFILE",
                   help="Ed25519 private key (PEM): also write signature.json, which `clickvec stream "
                        "--trust PUBKEY` requires (make a pair with `clickvec export keygen --out DIR`)")
    p.add_argument("--surprise", default="auto", metavar="MODE",
                   help="exact: the item term's softmax over the whole catalogue; approx[:head=K,clusters=C,"
                        "rank=R]: the observed item's logit exact, log Z from the K largest-bias items and C "
                        "clusters of the rest (cost independent of the catalogue; error in the manifest); "
                        f"auto (default): exact up to {AUTO_EXACT_MAX_ITEMS} items, approx above")
    a = p.parse_args(argv)
    return ExportConfig(a.run, a.out, a.fp16, a.int8, a.sequences, a.min_cosine, a.seed, a.force, a.sign,
                        a.surprise)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["keygen"] and not Path("keygen").exists():  # a run dir of that name wins
        from clickvec.bundle.signing import main as signing_main

        return signing_main(argv)
    cfg = parse_args(argv)
    from clickvec.export.surprise import parse_mode

    try:
        parse_mode(cfg.surprise)  # before the slow imports: a typo fails at once
    except ClickvecError as e:
        print(f"clickvec export: {e}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("export config: %s", json.dumps(asdict(cfg)))
    from clickvec.export.writer import export_bundle, load_sequences

    try:
        seqs = load_sequences(cfg.sequences) if cfg.sequences else None
        manifest = export_bundle(
            cfg.run, cfg.out, fp16=cfg.fp16, int8=cfg.int8, sequences=seqs,
            min_cosine=cfg.min_cosine, seed=cfg.seed, force=cfg.force, sign=cfg.sign, surprise=cfg.surprise,
        )
    except (ClickvecError, FileNotFoundError) as e:
        print(f"clickvec export: {e}", file=sys.stderr)
        return 1
    summary = {
        "bundle": str(Path(cfg.out)),
        "model_id": manifest["model_id"],
        "variants": {k: v.get("cosine_to_fp32", {}).get("min", 1.0) for k, v in manifest["variants"].items()},
        "parity_max_abs_diff": manifest["parity"]["max_abs_diff_overall"],
        "surprise": manifest["surprise"]["label"],
    }
    if cfg.sign:
        summary["signed"] = str(Path(cfg.out) / "signature.json")
    print(json.dumps(summary, indent=1))
    if manifest["refused_variants"]:
        for v, why in manifest["refused_variants"].items():
            print(f"clickvec export: {v} encoder refused and not written: {why}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
