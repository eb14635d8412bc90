"""A site runs only apps it approved: the allow-list and signature checks of gate/pinning.py, the warm ClientApp's
refusal, and `fedclip-approve` (the hash `flwr run` would send, reproducibly; keys and signatures)."""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.app import Context, RecordDict
from flwr.cli.build import build_fab_from_disk, build_fab_from_files
from flwr.common.typing import Fab, Run

from gate import approve, warm
from gate.pinning import AppPolicy, PolicyFileError, fab_sha256, openssh_public_key, public_key_id, read_approved, sign

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fab() -> bytes:
    return build_fab_from_disk(REPO)


def app_copy(dest: Path) -> Path:
    """A copy of this app's files as a checkout of it holds them (what git tracks or would track): the FAB of `fab`."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
    )
    for name in listed.stdout.splitlines():
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def tampered(fab: bytes) -> bytes:
    """The FAB with one byte changed."""
    return fab[:100] + bytes([fab[100] ^ 1]) + fab[101:]


def approvals(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "approved-apps.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def trusted(tmp_path: Path, **keys: ed25519.Ed25519PublicKey) -> Path:
    path = tmp_path / "trusted-keys.yaml"
    path.write_text("".join(f"{key_id}: '{openssh_public_key(key, 'test')}'\n" for key_id, key in keys.items()))
    return path


def test_approved_hash_runs_and_one_changed_byte_is_refused_naming_hash_file_and_fix(tmp_path, fab):
    sha = fab_sha256(fab)
    policy = AppPolicy(
        approved_apps=approvals(
            tmp_path, "# release 0.1.0, reviewed by the site", f"{sha.upper()}  fedclip 0.1.0  # ok"
        )
    )
    assert policy.problem(fab) == (sha, None)
    bad_sha, why = policy.problem(tampered(fab), name="fedclip/fedclip 0.1.0")
    assert bad_sha != sha and why is not None
    assert bad_sha in why and str(policy.approved_apps) in why and "not in the approved-apps file" in why
    assert f"add the line `{bad_sha}  fedclip/fedclip 0.1.0`" in why and "fedclip-approve" in why


def test_the_approved_apps_file_is_read_at_every_check_and_a_broken_one_refuses_everything(tmp_path, fab):
    path = approvals(tmp_path, "# nothing approved yet")
    policy = AppPolicy(approved_apps=path)
    assert policy.problem(fab)[1] is not None
    approvals(tmp_path, fab_sha256(fab))  # approving takes effect without a restart
    assert policy.problem(fab)[1] is None
    approvals(tmp_path, fab_sha256(fab), "not-a-hash fedclip")
    _, why = policy.problem(fab)
    assert "line 2: 'not-a-hash' is not a SHA-256 hash" in why and "no app runs until it is fixed" in why
    path.unlink()
    assert "cannot read the approved-apps file" in policy.problem(fab)[1]
    with pytest.raises(PolicyFileError, match="cannot read"):
        policy.validate()


def test_read_approved_keeps_names_and_skips_comments(tmp_path):
    a, b = "a" * 64, "B" * 64
    assert read_approved(approvals(tmp_path, "", f"  {a}   fedclip 0.1.0", "# a comment", f"{b}")) == {
        a: "fedclip 0.1.0",
        b.lower(): "",
    }


def test_signature_by_a_trusted_key_runs_and_tampering_or_a_wrong_key_is_refused(tmp_path, fab):
    release, other = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    policy = AppPolicy(trusted_keys=trusted(tmp_path, fpk_release=release.public_key()))
    sha = fab_sha256(fab)
    good = sign(release, sha, "fpk_release")
    assert policy.problem(fab, good) == (sha, None)
    assert "does not match this FAB" in policy.problem(tampered(fab), good)[1]  # one byte changed after signing
    # another key, claiming the trusted id
    assert "does not match this FAB" in policy.problem(fab, sign(other, sha, "fpk_release"))[1]
    assert "not among the trusted keys (fpk_release)" in policy.problem(fab, sign(other, sha))[1]
    assert "came without a fab-signature" in policy.problem(fab, "")[1]
    assert "is not `<key id>:<signed at>:<base64url signature>`" in policy.problem(fab, "garbage")[1]
    # either way approves: the site's list, or a trusted signature
    both = AppPolicy(approved_apps=approvals(tmp_path, "# none"), trusted_keys=policy.trusted_keys)
    assert both.problem(fab, good)[1] is None
    _, why = both.problem(fab)
    assert "not in the approved-apps file" in why and "came without a fab-signature" in why


def test_trusted_keys_file_must_hold_ed25519_keys(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("fpk_x: 'ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC7 nope'\n")
    with pytest.raises(PolicyFileError, match="fpk_x"):
        AppPolicy(trusted_keys=path).validate()
    path.write_text("[]\n")
    with pytest.raises(PolicyFileError, match="must map key ids to public keys"):
        AppPolicy(trusted_keys=path).validate()


def test_without_a_policy_any_app_runs(fab):
    policy = AppPolicy()
    assert not policy.enforced and policy.problem(tampered(fab))[1] is None
    assert "any app" in policy.validate()


def test_warm_refusal_names_the_node_and_logs_what_to_do(tmp_path, fab, caplog):
    policy = AppPolicy(approved_apps=approvals(tmp_path, fab_sha256(fab)))
    context = Context(
        run_id=7, node_id=42, node_config={"domain": "photo"}, state=RecordDict(), run_config={"overrides": ""}
    )
    run = Run.create_empty(7)
    run.fab_id, run.fab_version = "fedclip/fedclip", "0.1.0"
    seen: set[str] = set()
    with caplog.at_level(logging.INFO):
        assert warm.refusal(policy, context, run, Fab(fab_sha256(fab), fab, {}), seen) == (fab_sha256(fab), None)
        # a FAB whose hash field claims the approved hash: the content decides
        sha, reason = warm.refusal(policy, context, run, Fab(fab_sha256(fab), tampered(fab), {}), seen)
    assert sha == fab_sha256(tampered(fab)) and reason.startswith(
        "node 42 (photo) refused the app: app fedclip/fedclip 0.1.0"
    )
    assert "REFUSED run 7" in caplog.text and f"add the line `{sha}  fedclip/fedclip 0.1.0`" in caplog.text
    assert "is approved: it runs" in caplog.text
    assert "no FAB came with its message" in warm.refusal(policy, context, run, None, seen)[1]


def test_warm_clientapp_will_not_start_with_a_broken_policy_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["fedclip-clientapp", "--approved-apps", str(tmp_path / "missing.txt")])
    with pytest.raises(SystemExit) as exit_info:
        warm.main()
    assert exit_info.value.code == 2 and "cannot read the approved-apps file" in capsys.readouterr().err


def test_approve_prints_the_hash_flwr_run_sends(capsys, fab):
    approve.main([str(REPO)])
    out, err = capsys.readouterr()
    assert out == f"{fab_sha256(fab)}  fedclip/fedclip 0.1.0\n"  # the FAB `flwr run` builds from the same folder
    assert "twice, same bytes" in err


def test_the_fab_holds_the_apps_packages_and_config_only_uncompressed(fab):
    """pyproject.toml's fab-include: the FAB holds server_app/, client_app/, common/ and conf/ (and Flower's
    pyproject.toml and
    manifest), not docs/, tests/, benchmarks/ or docker/. Every entry is stored, not deflated: the bytes, and so the
    hash,
    do not depend on the zlib the Python that builds it links."""
    entries = zipfile.ZipFile(io.BytesIO(fab)).infolist()
    included = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["fab-include"]
    assert included == ["server_app/**", "client_app/**", "common/**", "conf/**"]
    assert {e.filename.split("/")[0] for e in entries} == {
        "server_app",
        "client_app",
        "common",
        "conf",
        "pyproject.toml",
        ".info",
    }
    assert {e.compress_type for e in entries} == {zipfile.ZIP_STORED}
    # the demo's pretrained CLIP ships with the app
    assert "common/demo/demo_clip.json" in {e.filename for e in entries}


def test_editing_docs_tests_benchmarks_docker_the_gate_or_predict_keeps_the_approved_hash(tmp_path, fab):
    """Sites re-approve only when the app's code or configuration changes, not at every doc edit, nor when the
    site's gate
    or the predict tool (installed beside the app, not part of it) changes."""
    app = app_copy(tmp_path / "fedclip")
    assert fab_sha256(build_fab_from_disk(app)) == fab_sha256(fab)  # the copy is the approved app
    for name in (
        "README.md",
        "docs/security.md",
        "tests/conftest.py",
        "benchmarks/noop_app.py",
        "docker/compose.yml",
        "gate/warm.py",
        "gate/pinning.py",
        "predict/cli.py",
        "predict/classifier.py",
    ):
        with open(app / name, "a") as file:
            file.write("\n# an edit\n")
    (app / "docs" / "new-page.md").write_text("# a new page\n")
    assert fab_sha256(build_fab_from_disk(app)) == fab_sha256(fab)
    with open(app / "conf" / "config.yaml", "a") as file:  # the app's configuration is part of what a site approves
        file.write("\n# an edit\n")
    assert fab_sha256(build_fab_from_disk(app)) != fab_sha256(fab)


def test_the_gate_imports_nothing_of_the_app_it_checks():
    """The warm process, the policy and fedclip-approve import no module of server_app, client_app or common: the only
    copy of the app the gate ever runs is the approved FAB's, loaded by Flower's app loader from the approved
    install."""
    code = (
        "import sys, gate.warm, gate.pinning, gate.approve; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('server_app', 'client_app', 'common', 'predict')))"
    )
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
        ).stdout.strip()
        == "[]"
    )


def test_approve_warns_of_uncommitted_changes_in_the_fab_only(tmp_path, capsys):
    app = app_copy(tmp_path / "fedclip")
    git = ["git", "-C", str(app), "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "release"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    approve.main([str(app)])
    assert "WARNING" not in capsys.readouterr().err  # a clean checkout
    with open(app / "docs" / "security.md", "a") as file:
        file.write("\nan edit\n")
    (app / "common" / "extra.py").write_text("x = 1\n")
    approve.main([str(app)])
    assert (
        capsys.readouterr().err.splitlines()[-1]
        == "WARNING: not a clean checkout, the FAB holds these changes: common/extra.py"
    )


def test_approve_names_the_files_that_differ_between_two_builds(monkeypatch, tmp_path):
    def build(source: bytes) -> bytes:
        files = {"pyproject.toml": (REPO / "pyproject.toml").read_bytes(), "client_app/a.py": source}
        files.update(
            {f"{package}/__init__.py": b"" for package in ("server_app", "common")} | {"conf/config.yaml": b""}
        )
        return build_fab_from_files(files)[0]  # every fab-include pattern must match a file

    builds = iter([build(b"x = 1\n"), build(b"x = 2\n")])
    monkeypatch.setattr(approve, "build_fab_from_disk", lambda app: next(builds))
    with pytest.raises(SystemExit, match=r"two builds of .* differ \(client_app/a.py\)"):
        approve.reproducible_fab(tmp_path)


def test_keygen_and_sign_give_what_a_site_verifies(tmp_path, capsys, fab):
    approve.main(["--keygen", str(tmp_path / "release")])
    trusted_line = capsys.readouterr().out.strip()
    assert (tmp_path / "release").stat().st_mode & 0o077 == 0
    (tmp_path / "trusted-keys.yaml").write_text(trusted_line + "\n")
    approve.main([str(REPO), "--sign", str(tmp_path / "release")])
    hash_line, signature_line = capsys.readouterr().out.splitlines()
    assert hash_line.split()[0] == fab_sha256(fab) and signature_line.startswith('fab-signature="fpk_')
    policy = AppPolicy(trusted_keys=tmp_path / "trusted-keys.yaml")
    token = signature_line.split('"')[1]
    assert policy.problem(fab, token)[1] is None and "does not match" in policy.problem(tampered(fab), token)[1]
    with pytest.raises(SystemExit, match="not overwriting"):
        approve.main(["--keygen", str(tmp_path / "release")])


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen (Debian: openssh-client)")
def test_an_ssh_keygen_key_signs_too(tmp_path, capsys, fab):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    approve.main([str(REPO), "--sign", str(tmp_path / "k"), "--key-id", "fpk_site_given"])
    token = capsys.readouterr().out.splitlines()[1].split('"')[1]
    (tmp_path / "keys.yaml").write_text(f"fpk_site_given: '{(tmp_path / 'k.pub').read_text().strip()}'\n")
    assert (
        token.startswith("fpk_site_given:")
        and AppPolicy(trusted_keys=tmp_path / "keys.yaml").problem(fab, token)[1] is None
    )


def test_key_ids_are_flower_style_and_stable():
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    assert (
        public_key_id(key) == public_key_id(key)
        and public_key_id(key).startswith("fpk_")
        and len(public_key_id(key)) == 36
    )


def test_the_run_config_cannot_name_code_for_a_site_to_run(tmp_path):
    """Pinning the app is void if the configuration a run brings can call any function: only this app's method
    classes are built."""
    from common.config import load_config
    from common.methods.base import load_method

    (tmp_path / "secret").write_text("site data")
    copied = tmp_path / "copied"
    with pytest.raises(ValueError, match="not a method of this app"):
        load_method(load_config("method._target_=shutil.copyfile"))
    with pytest.raises(Exception):  # noqa: B017 - the method rejects the unknown key; the point is that nothing nested ran
        load_method(
            load_config(f"+method.x._target_=shutil.copyfile +method.x._args_=[{tmp_path / 'secret'},{copied}]")
        )
    assert not copied.exists()
    assert type(load_method(load_config("method=promptfl"))).__name__ == "PromptFL"
