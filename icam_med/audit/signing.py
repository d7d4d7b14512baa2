"""Signed ledger heads: tamper-proof, not only tamper-evident.

The ledger's hash chain shows that entries were changed, removed or reordered, but it is
unkeyed: anyone who can write the folder can rebuild the whole chain. At the end of every
run (a batch ``audit``, one ``explain``) the run's last entry - the ledger head, which by
the chain commits to every entry before it - is signed with a site's Ed25519 private key.
``icam-med verify --public-key KEY.pem`` then checks that every run carries a valid
signature by that key; a run without one is reported as unsigned.

The signatures live in ``<folder>/ledger.sig.jsonl``, one JSON object per line. The private
key never enters the folder: its location comes from the config (``audit.signing_key_file``,
or ``audit.signing_key_env`` naming an environment variable that holds the path) or from the
environment variable ``ICAM_MED_SIGNING_KEY`` (the path), and a key file inside the folder
being signed is refused.

What a valid signature proves: the holder of the private key saw this ledger, up to that
entry, with these entry hashes (and so these record and output hashes). It does not prove
that the inputs were what they claim, nor that the key was not stolen; an unsigned run may
simply have been written without a key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icam_med.audit.hashing import canonical_json

__all__ = [
    "SIGNATURES_NAME",
    "SIGNING_KEY_ENV",
    "LedgerSignature",
    "SigningKey",
    "check_key_outside",
    "generate_signing_key",
    "head_message",
    "key_id",
    "load_public_key",
    "load_signing_key",
    "read_signatures",
    "sign_head",
]

#: Environment variable holding the path of the Ed25519 private key (PEM, PKCS#8).
SIGNING_KEY_ENV = "ICAM_MED_SIGNING_KEY"
SIGNATURES_NAME = "ledger.sig.jsonl"
SIGNATURE_SCHEMA = "icam-med.ledger-signature/1"
_DOMAIN = b"icam-med ledger head v1\n"


def head_message(run_id: str, seq: int, entry_sha256: str) -> bytes:
    """The bytes a signature covers: a fixed domain tag, then the run, the head's sequence
    number and its ``entry_sha256``."""
    return _DOMAIN + f"{run_id}\n{int(seq)}\n{entry_sha256}\n".encode("ascii")


def _public_bytes(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw,
                                   serialization.PublicFormat.Raw)


def key_id(public_key: Any) -> str:
    """A short fingerprint of an Ed25519 public key (SHA-256 of its raw bytes, 16 hex)."""
    return hashlib.sha256(_public_bytes(public_key)).hexdigest()[:16]


@dataclass(frozen=True, repr=False)
class SigningKey:
    """An Ed25519 private key and where it came from. ``repr`` never shows the key."""

    private_key: Any
    source: str
    path: Path | None = None

    @property
    def key_id(self) -> str:
        return key_id(self.private_key.public_key())

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r}, source={self.source!r})"


def _read_private_key(path: Path, source: str) -> SigningKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not path.is_file():
        raise FileNotFoundError(
            f"signing key file {path} ({source}) does not exist; create one with "
            "`python -c \"from icam_med.audit.signing import generate_signing_key; "
            "generate_signing_key('site.pem')\"` or remove the setting.")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"signing key file {path} ({source}) is not an unencrypted PEM private key "
            f"({exc}); give an Ed25519 key in PKCS#8 PEM.") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"signing key file {path} ({source}) holds a "
                         f"{type(key).__name__}; ledger heads are signed with Ed25519 keys.")
    return SigningKey(key, source, path)


def load_signing_key(audit_cfg: Mapping[str, Any] | None = None,
                     environ: Mapping[str, str] | None = None,
                     base_dir: str | Path | None = None) -> SigningKey | None:
    """The site's signing key, or ``None`` when none is configured (runs stay unsigned).

    Args:
        audit_cfg: the config's ``audit`` section: ``signing_key_file`` (a path, relative
            to ``base_dir``) or ``signing_key_env`` (the name of an environment variable
            holding the path).
        environ: the environment (default ``os.environ``); ``ICAM_MED_SIGNING_KEY`` (a path)
            is read when the config names no key.
        base_dir: folder relative ``signing_key_file`` paths are resolved against.

    Raises:
        ValueError: the config holds a key itself, names an unset variable, or the file is
            not an Ed25519 private key.
        FileNotFoundError: the key file does not exist.
    """
    cfg = dict(audit_cfg or {})
    env = os.environ if environ is None else environ
    if "signing_key" in cfg:
        raise ValueError("config 'audit.signing_key' would hold a private key in a config "
                         "file; name its file ('audit.signing_key_file') instead.")
    if cfg.get("signing_key_file"):
        p = Path(cfg["signing_key_file"]).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = Path(base_dir) / p
        return _read_private_key(p, "config audit.signing_key_file")
    var = cfg.get("signing_key_env")
    if var:
        if not env.get(var):
            raise ValueError(
                f"config 'audit.signing_key_env' names environment variable {var}, which is "
                "unset or empty; export it with the key file's path, or remove the setting.")
        return _read_private_key(Path(env[var]).expanduser(), f"environment variable {var}")
    if env.get(SIGNING_KEY_ENV):
        return _read_private_key(Path(env[SIGNING_KEY_ENV]).expanduser(),
                                 f"environment variable {SIGNING_KEY_ENV}")
    return None


def check_key_outside(key: SigningKey | None, folder: str | Path) -> None:
    """Refuse a key whose file lies inside the folder it would sign.

    Raises:
        ValueError: the key file is inside ``folder``.
    """
    if key is None:
        return
    if key.path is not None and key.path.resolve().is_relative_to(Path(folder).resolve()):
        raise ValueError(f"the signing key {key.path} lies inside the audit folder "
                         f"{folder}; keep it outside (whoever can read the folder could sign).")


def load_public_key(path: str | Path) -> Any:
    """An Ed25519 public key from a PEM file (a private key file gives its public half).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not an Ed25519 key in PEM.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"public key file {p} does not exist; give the site's Ed25519 "
                                "public key (PEM).")
    data = p.read_bytes()
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError):
            raise ValueError(f"{p} is not an Ed25519 key in PEM; give the site's public "
                             "key (`-----BEGIN PUBLIC KEY-----`).") from None
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{p} holds a {type(key).__name__}; ledger heads are signed with "
                         "Ed25519 keys.")
    return key


def generate_signing_key(path: str | Path) -> Path:
    """Write a new Ed25519 private key (PKCS#8 PEM, mode 0600) and its public key beside it
    (``<name>.pub.pem``); returns the private key's path. Never overwrites.

    Raises:
        FileExistsError: either file exists.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    p = Path(path)
    pub = p.with_name(p.name.removesuffix(".pem") + ".pub.pem")
    for q in (p, pub):
        if q.exists():
            raise FileExistsError(f"{q} exists; keys are never overwritten.")
    key = Ed25519PrivateKey.generate()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return p


@dataclass(frozen=True)
class LedgerSignature:
    """One line of ``ledger.sig.jsonl``: a run's head, signed.

    Attributes:
        run_id: the run.
        seq: the sequence number of the run's last entry (the head when it was signed).
        entry_sha256: that entry's hash.
        key_id: fingerprint of the public key that is meant to verify it.
        signature: the Ed25519 signature over :func:`head_message`.
        line: the 1-based line in the signatures file.
    """

    run_id: str
    seq: int
    entry_sha256: str
    key_id: str
    signature: bytes
    line: int

    def valid_for(self, public_key: Any) -> bool:
        """Whether the signature verifies under ``public_key``."""
        from cryptography.exceptions import InvalidSignature

        try:
            public_key.verify(self.signature,
                              head_message(self.run_id, self.seq, self.entry_sha256))
        except InvalidSignature:
            return False
        return True


def read_signatures(folder: str | Path) -> tuple[list[LedgerSignature], list[tuple[int, str]]]:
    """``(signatures, problems)`` of a folder's ``ledger.sig.jsonl`` (none when absent);
    each problem is ``(line, what is wrong)``, never an exception."""
    path = Path(folder) / SIGNATURES_NAME
    if not path.is_file():
        return [], []
    sigs: list[LedgerSignature] = []
    problems: list[tuple[int, str]] = []
    for i, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            d = json.loads(raw)
            if not isinstance(d, dict) or d.get("schema") != SIGNATURE_SCHEMA:
                raise ValueError("not a ledger signature")
            sigs.append(LedgerSignature(
                run_id=str(d["run_id"]), seq=int(d["seq"]), entry_sha256=str(d["entry_sha256"]),
                key_id=str(d["key_id"]), signature=base64.b64decode(d["signature"],
                                                                    validate=True),
                line=i))
        except (ValueError, KeyError, TypeError, RecursionError):
            problems.append((i, "not a valid ledger signature (changed bytes?)"))
    return sigs, problems


def sign_head(folder: str | Path, key: SigningKey, run_id: str, seq: int,
              entry_sha256: str) -> LedgerSignature:
    """Sign a run's head and append the signature to ``ledger.sig.jsonl`` (one write of one
    line, under the ledger's lock held by the caller or taken here).

    Raises:
        ValueError: the key file lies inside ``folder``.
    """
    from icam_med.audit.ledger import Ledger

    check_key_outside(key, folder)
    signature = key.private_key.sign(head_message(run_id, seq, entry_sha256))
    line = canonical_json({
        "schema": SIGNATURE_SCHEMA, "algorithm": "Ed25519", "run_id": run_id, "seq": int(seq),
        "entry_sha256": entry_sha256, "key_id": key.key_id,
        "signature": base64.b64encode(signature).decode("ascii"),
    }) + b"\n"
    with Ledger(folder).locked():
        fd = os.open(Path(folder) / SIGNATURES_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                     0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    return LedgerSignature(run_id, int(seq), entry_sha256, key.key_id, signature, 0)
