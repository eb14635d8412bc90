"""Which apps a site runs: the FAB's SHA-256, computed here, approved by the site's list or signed by a key the site
trusts.

A Flower SuperNode runs whatever app (FAB) the SuperLink hands it, and anyone who reaches the
SuperLink's Control API can hand it one. The warm ClientApp (gate/warm.py) runs from the
site's own installation, so it can check the run's FAB before installing or importing any of it:

- an approved-apps file: one FAB hash a line (64 hex digits, as `flwr ls` and `fedclip-approve`
  print them), anything after the hash is a name, `#` starts a comment; or
- a trusted-keys file in Flower's `flower-supernode --trusted-entities` format (YAML, key id ->
  `ssh-ed25519 AAAA... comment`), and a signature by one of those keys over the FAB's hash, in
  Flower's form (Ed25519 over the 8-byte big-endian signing time followed by the SHA-256 digest),
  which travels with the run as its run-config key `fab-signature` = `<key id>:<signed at>:<base64url>`.

The hash is always computed from the FAB's bytes here, never taken from a field. Both files are
read again at every check, so an approval takes effect without a restart, and a file that cannot be
read refuses every app (fail closed).
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign, decode_base64url, verify_signature

SIGNATURE_KEY = "fab-signature"  # the run-config key a signature travels in (pyproject.toml declares it, empty)
HASH = re.compile(r"^[0-9a-fA-F]{64}$")


class PolicyFileError(ValueError):
    """A site's approved-apps or trusted-keys file that cannot be used: what is wrong and how to fix it."""


def fab_sha256(fab: bytes) -> str:
    """The FAB's hash as Flower computes it (`flwr run`, the SuperLink, `flwr ls`): SHA-256 of the FAB's bytes, hex."""
    return hashlib.sha256(fab).hexdigest()


def read_approved(path: Path) -> dict[str, str]:
    """The approved-apps file as hash -> name ('' when none was given)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise PolicyFileError(f"cannot read the approved-apps file {path}: {err.strerror}") from err
    approved = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        digest, _, name = line.partition(" ")
        if not HASH.match(digest):
            raise PolicyFileError(
                f"{path}, line {number}: {digest!r} is not a SHA-256 hash (64 hex digits); "
                "each line is `<sha256> [name]`, as `fedclip-approve` prints it"
            )
        approved[digest.lower()] = name.strip()
    return approved


def public_key_id(key: ed25519.Ed25519PublicKey) -> str:
    """A Flower-style `fpk_` id derived from the key itself, so that signer and site name the key alike without a
    registry."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "fpk_" + hashlib.sha256(raw).hexdigest()[:32]


def openssh_public_key(key: ed25519.Ed25519PublicKey, comment: str = "") -> str:
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment}".strip()


def read_trusted_keys(path: Path) -> dict[str, ed25519.Ed25519PublicKey]:
    """Flower's trusted-entities YAML (`fpk_id: 'ssh-ed25519 AAAA... comment'`) as key id -> Ed25519 public key."""
    try:
        entries = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise PolicyFileError(f"cannot read the trusted-keys file {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise PolicyFileError(f"the trusted-keys file {path} is not YAML: {err}") from err
    if not isinstance(entries, dict) or not entries:
        raise PolicyFileError(
            f"the trusted-keys file {path} must map key ids to public keys, e.g. "
            "`fpk_0123...: 'ssh-ed25519 AAAA... release'` (`fedclip-approve --keygen KEY` prints the line)"
        )
    keys = {}
    for key_id, value in entries.items():
        try:
            key = serialization.load_ssh_public_key(str(value).encode())
        except (ValueError, TypeError) as err:
            raise PolicyFileError(f"{path}: the key of {key_id!r} is not an OpenSSH public key: {err}") from err
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise PolicyFileError(f"{path}: the key of {key_id!r} is not Ed25519 (`ssh-ed25519 ...`)")
        keys[str(key_id)] = key
    return keys


def sign(
    private_key: ed25519.Ed25519PrivateKey, sha256: str, key_id: str | None = None, signed_at: int | None = None
) -> str:
    """The `fab-signature` value for a FAB hash: Flower's signed message (signing time + digest), base64url without
    padding."""
    signed_at = int(time.time()) if signed_at is None else signed_at
    signature = private_key.sign(create_message_to_sign(bytes.fromhex(sha256), signed_at))
    key_id = key_id or public_key_id(private_key.public_key())
    return f"{key_id}:{signed_at}:{base64.urlsafe_b64encode(signature).decode().rstrip('=')}"


def signature_problem(sha256: str, token: str, keys: dict[str, ed25519.Ed25519PublicKey]) -> str | None:
    """Why `token` does not sign this hash with a trusted key (None: it does)."""
    try:
        key_id, signed_at, signature = token.strip().split(":")
        message, raw = create_message_to_sign(bytes.fromhex(sha256), int(signed_at)), decode_base64url(signature)
    except ValueError:
        return f"its {SIGNATURE_KEY} {token[:40]!r} is not `<key id>:<signed at>:<base64url signature>`"
    if key_id not in keys:
        return (
            f"its {SIGNATURE_KEY} is by key {key_id}, which is not among the trusted keys ({', '.join(sorted(keys))})"
        )
    if not verify_signature(keys[key_id], message, raw):
        return (
            f"its {SIGNATURE_KEY} by {key_id} does not match this FAB: the app was changed after it was signed, "
            "or the signature belongs to another release"
        )
    return None


@dataclass(frozen=True)
class AppPolicy:
    """What a site runs: apps whose hash its approved-apps file lists, or signed by a key in its trusted-keys file."""

    approved_apps: Path | None = None
    trusted_keys: Path | None = None

    @property
    def enforced(self) -> bool:
        return self.approved_apps is not None or self.trusted_keys is not None

    def validate(self) -> str:
        """Read both files once (at start: a broken file is an error now, not a refusal later); a summary for the
        log."""
        parts = []
        if self.approved_apps is not None:
            parts.append(f"{len(read_approved(self.approved_apps))} approved app hash(es) in {self.approved_apps}")
        if self.trusted_keys is not None:
            parts.append(f"signatures by {', '.join(read_trusted_keys(self.trusted_keys))} ({self.trusted_keys})")
        return " or ".join(parts) if parts else "any app (no --approved-apps or --trusted-keys)"

    def problem(self, fab: bytes, signature: str = "", name: str = "") -> tuple[str, str | None]:
        """(the FAB's SHA-256, None if this site runs it, else why not and how to approve it); `name` labels the
        approval line."""
        sha256 = fab_sha256(fab)
        if not self.enforced:
            return sha256, None
        reasons = []
        try:
            if self.approved_apps is not None:
                if sha256 in read_approved(self.approved_apps):
                    return sha256, None
                reasons.append(f"its SHA-256 is not in the approved-apps file {self.approved_apps}")
            if self.trusted_keys is not None:
                if not signature:
                    reasons.append(f"it came without a {SIGNATURE_KEY} (the trusted keys are in {self.trusted_keys})")
                elif (why := signature_problem(sha256, signature, read_trusted_keys(self.trusted_keys))) is None:
                    return sha256, None
                else:
                    reasons.append(why)
        except PolicyFileError as err:
            reasons.append(f"the site's policy cannot be read ({err}), so no app runs until it is fixed")
        how = (
            f"To run this release, review it and add the line `{sha256}  {name}` to {self.approved_apps} "
            f"(`fedclip-approve "
            "<app folder>` prints it from the release's source)"
            if self.approved_apps
            else f"To run it, sign its hash with a trusted key (`fedclip-approve <app folder> --sign KEY`) and pass "
            f"the "
            f"{SIGNATURE_KEY} it prints to `flwr run --run-config`"
        )
        return (
            sha256,
            f"app {name} with SHA-256 {sha256} is not approved: {'; '.join(reasons)}. {how}, or run a release the "
            f"site approved.",
        )
