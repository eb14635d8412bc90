"""`fedclip-approve`: the hash a site approves for a release, a signature of it, and signing keys.

    fedclip-approve [APP_FOLDER]                 # stdout: `<sha256>  <publisher>/<name> <version>`, a line of an
    approved-apps file
    fedclip-approve [APP_FOLDER] --sign KEY      # and a second line: `fab-signature="<key id>:<signed at>:<signature>"`
    fedclip-approve --keygen KEY                 # writes KEY (private, OpenSSH) and KEY.pub; stdout: the
    trusted-keys line

The FAB is built with Flower's own `build_fab_from_disk`, exactly as `flwr run APP_FOLDER` builds the
FAB it sends, so the hash is the one the SuperLink stores (`flwr ls`) and the sites compute. Flower
writes every zip entry uncompressed, with a fixed date and in sorted order, so the same files give
the same bytes; the folder is built twice and the two hashes must agree. The FAB holds the files of
pyproject.toml's `fab-include` (the app's packages and conf/) that .gitignore lets through, tracked
by git or not: approve a clean checkout of the release (a warning names the FAB's files that git
does not know or that differ from the commit).
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import zipfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.cli.build import build_fab_from_disk
from flwr.common.config import get_fab_config, get_metadata_from_config
from flwr.supercore.primitives.asymmetric_ed25519 import load_private_key

from gate.pinning import SIGNATURE_KEY, fab_sha256, openssh_public_key, public_key_id, sign


def reproducible_fab(app: Path) -> bytes:
    """The FAB `flwr run app` sends, built twice; an error names the files whose content differed between the builds."""
    first, second = build_fab_from_disk(app), build_fab_from_disk(app)
    if first != second:

        def manifest(fab: bytes) -> set[str]:
            return set(zipfile.ZipFile(io.BytesIO(fab)).read(".info/CONTENT").decode().splitlines())

        changed = sorted({line.split(",")[0] for line in manifest(first) ^ manifest(second)})
        raise SystemExit(
            f"fedclip-approve: two builds of {app} differ ({', '.join(changed) or 'same files: the zip itself'}); "
            "something writes into the folder while it is built. Approve a quiet, clean checkout of the release."
        )
    return first


def uncommitted(app: Path, fab: bytes) -> list[str]:
    """The FAB's files that git reports as changed or untracked in the folder; [] outside a git checkout."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(app), *args], capture_output=True, text=True, check=False)

    status, prefix = git("status", "--porcelain", "--untracked-files=all", "--", "."), git("rev-parse", "--show-prefix")
    if status.returncode != 0 or prefix.returncode != 0:
        return []
    in_fab = set(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    # porcelain paths are relative to the repository's root (a rename reads `old -> new`); the FAB's to the app folder
    paths = [
        line[3:].split(" -> ")[-1].strip('"').removeprefix(prefix.stdout.strip()) for line in status.stdout.splitlines()
    ]
    return [path for path in paths if path in in_fab]


def keygen(path: Path) -> str:
    """A new Ed25519 key pair at path (private, OpenSSH, mode 600) and path.pub; returns the trusted-keys line for
    the sites."""
    if path.exists() or path.with_suffix(path.suffix + ".pub").exists():
        raise SystemExit(f"fedclip-approve: {path} or {path}.pub exists; not overwriting a key")
    key = ed25519.Ed25519PrivateKey.generate()
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    path.chmod(0o600)
    public = openssh_public_key(key.public_key(), "fedclip-release")
    path.with_suffix(path.suffix + ".pub").write_text(public + "\n")
    return f"{public_key_id(key.public_key())}: '{public}'"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fedclip-approve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "app", nargs="?", type=Path, default=Path("."), help="the app's folder, as given to `flwr run` (default: .)"
    )
    parser.add_argument(
        "--sign", type=Path, metavar="KEY", help="also sign the hash with this Ed25519 private key (OpenSSH format)"
    )
    parser.add_argument(
        "--key-id",
        help="the id the sites' trusted-keys file gives the key (default: derived from the key, as --keygen prints it)",
    )
    parser.add_argument(
        "--keygen",
        type=Path,
        metavar="KEY",
        help="write a new signing key pair KEY and KEY.pub, print the sites' trusted-keys line",
    )
    args = parser.parse_args(argv)
    if args.keygen:
        print(keygen(args.keygen))
        print(
            f"add that line to each site's trusted-keys file (fedclip-clientapp --trusted-keys); keep {args.keygen} "
            f"private",
            file=sys.stderr,
        )
        return
    app = args.app.expanduser().resolve()
    if not (app / "pyproject.toml").is_file():
        parser.error(f"{app} holds no pyproject.toml: give the app's folder, as for `flwr run`")
    fab = reproducible_fab(app)
    sha256 = fab_sha256(fab)
    fab_id, version = get_metadata_from_config(get_fab_config(fab))
    files = len(zipfile.ZipFile(io.BytesIO(fab)).namelist()) - 1  # without .info/CONTENT
    print(f"{sha256}  {fab_id} {version}")
    print(
        f"built {app} as `flwr run` does, twice, same bytes: {files} files, {len(fab):,} bytes; add the line above "
        f"to each "
        "site's approved-apps file (fedclip-clientapp --approved-apps)",
        file=sys.stderr,
    )
    if changed := uncommitted(app, fab):
        print(
            f"WARNING: not a clean checkout, the FAB holds these changes: {', '.join(changed[:10])}"
            f"{' ...' if len(changed) > 10 else ''}",
            file=sys.stderr,
        )
    if args.sign:
        try:
            key = load_private_key(args.sign.expanduser())
        except (OSError, ValueError) as err:
            parser.error(f"--sign {args.sign}: not an unencrypted Ed25519 OpenSSH private key ({err})")
        print(f'{SIGNATURE_KEY}="{sign(key, sha256, args.key_id)}"')
        print(
            f"pass the line above to `flwr run ... --run-config` (sites that trust "
            f"key {args.key_id or public_key_id(key.public_key())} "
            "then run this release)",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
