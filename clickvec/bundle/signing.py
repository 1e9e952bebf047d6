"""Signed bundles (Ed25519): who exported a bundle, not only whether it is intact.

The sealed manifest lists the sha256 of every file, so one signature over its exact bytes
covers the whole bundle. The hashes alone catch damage, not forgery: whoever can change
the weights can re-hash them and re-seal the manifest. A signature needs the private key.

  python -m clickvec.bundle.signing keygen --out keys/       # keys/clickvec-signing.{key,pub}
  clickvec export runs/NAME --out models/NAME --sign keys/clickvec-signing.key
  clickvec stream --model models/NAME --trust keys/clickvec-signing.pub ...
  python -m clickvec.bundle.signing verify models/NAME --trust keys/clickvec-signing.pub

`clickvec export keygen --out DIR` does the same as the first line. A signed bundle holds
`signature.json` next to `manifest.json`: the algorithm, the key id (the first 16 hex
digits of the sha256 of the raw public key), the manifest's sha256 and the signature.
Readers that are not given a trusted key ignore it; `--trust` refuses a bundle that is
unsigned, signed by another key, or whose manifest changed after signing.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

from clickvec.bundle.format import MANIFEST, BundleError, sha256_bytes

SIGNATURE = "signature.json"
PRIVATE_KEY_FILE = "clickvec-signing.key"
PUBLIC_KEY_FILE = "clickvec-signing.pub"
# Domain separation: this key's signature over a manifest can never pass for a signature
# over anything else the same key might sign.
_CONTEXT = b"clickvec-bundle-signature-1\n"


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # only signing and --trust need it
        raise BundleError("signed bundles need the `cryptography` package: "
                          "pip install 'cryptography>=42'") from None
    return ed25519


def _raw_public(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Any) -> str:
    return sha256_bytes(_raw_public(public_key))[:16]


def generate_keys(out_dir: str | Path) -> tuple[Path, Path]:
    """A new Ed25519 key pair as PEM files in `out_dir`: (private key, public key). The
    private key file is readable by its owner only; an existing key is never overwritten."""
    from cryptography.hazmat.primitives import serialization

    out = Path(out_dir)
    priv_path, pub_path = out / PRIVATE_KEY_FILE, out / PUBLIC_KEY_FILE
    for p in (priv_path, pub_path):
        if p.exists():
            raise BundleError(f"{p} already exists: a key is never overwritten (choose another --out)")
    key = _crypto().Ed25519PrivateKey.generate()
    out.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path


def load_private_key(path: str | Path) -> Any:
    ed25519 = _crypto()
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise BundleError(f"cannot read the signing key {path}: {e}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise BundleError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Any:
    ed25519 = _crypto()
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as e:
        raise BundleError(f"cannot read the trusted public key {path}: {e}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise BundleError(f"{path} is not an Ed25519 public key")
    return key


def signature_record(manifest_bytes: bytes, private_key: Any) -> dict[str, Any]:
    return {
        "algorithm": "ed25519",
        "key_id": key_id(private_key.public_key()),
        "signed_file": MANIFEST,
        "manifest_sha256": sha256_bytes(manifest_bytes),
        "signature": base64.b64encode(private_key.sign(_CONTEXT + manifest_bytes)).decode(),
    }


def write_signature(bundle: str | Path, private_key: Any) -> Path:
    """Sign the manifest of the bundle directory `bundle`; returns signature.json's path."""
    bundle = Path(bundle)
    record = signature_record((bundle / MANIFEST).read_bytes(), private_key)
    path = bundle / SIGNATURE
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def verify_signature(bundle: str | Path, manifest_bytes: bytes, trust: str | Path) -> str:
    """Check that `manifest_bytes` (the bundle's manifest as read and verified) carry a
    valid signature by the public key in the file `trust`; return its key id, or raise
    a one-line BundleError naming what is wrong."""
    from cryptography.exceptions import InvalidSignature

    public_key = load_public_key(trust)
    want = key_id(public_key)
    path = Path(bundle) / SIGNATURE
    if not path.is_file():
        raise BundleError(f"bundle {bundle} is not signed ({SIGNATURE} is missing) and --trust "
                          f"requires a signature by key {want}")
    try:
        record = json.loads(path.read_text())
        sig = base64.b64decode(record["signature"], validate=True)
        signer = str(record["key_id"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BundleError(f"bundle {bundle}: {SIGNATURE} is unreadable ({e})") from None
    if signer != want:
        raise BundleError(f"bundle {bundle} is signed by key {signer}, not by the trusted key {want}")
    try:
        public_key.verify(sig, _CONTEXT + manifest_bytes)
    except InvalidSignature:
        raise BundleError(f"bundle {bundle}: the signature does not match its manifest (changed after "
                          "signing, or forged)") from None
    return want


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clickvec.bundle.signing", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("keygen", help="write a new key pair").add_argument("--out", required=True, type=Path)
    ps = sub.add_parser("sign", help="sign an exported bundle")
    ps.add_argument("bundle", type=Path)
    ps.add_argument("--key", required=True, type=Path)
    pv = sub.add_parser("verify", help="check a bundle's files and signature")
    pv.add_argument("bundle", type=Path)
    pv.add_argument("--trust", required=True, type=Path)
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if a.action == "keygen":
            priv, pub = generate_keys(a.out)
            print(f"private={priv}\npublic={pub}\nkey_id={key_id(load_public_key(pub))}")
        elif a.action == "sign":
            from clickvec.bundle.reader import verify_bundle

            key = load_private_key(a.key)
            verify_bundle(a.bundle)  # never vouch for a bundle that is already damaged
            print(f"signature={write_signature(a.bundle, key)}")
        else:
            from clickvec.bundle.reader import verify_bundle

            verify_bundle(a.bundle, trust=a.trust)
            print(f"ok: every file matches and the manifest is signed by key "
                  f"{key_id(load_public_key(a.trust))}")
    except BundleError as e:
        print(f"clickvec signing: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
