"""A warm ClientApp process for a deployed SuperNode: imports once, keeps each client's world between messages.

Flower 1.28's SuperNode (default `--isolation subprocess`) starts a fresh `flwr-clientapp` process for
every message: 4-5 s of imports and a rebuild of the client's data each time. The ServerApp does one
exchange a round (server_app/rounds.py), so a node gets at most one message a round (besides the discovery
query and the run's last evaluation): a train message that also carries the evaluation of the adapter
it brings, or an evaluate message. That cost comes once a round per node, not twice as when train and
evaluate were separate exchanges; a SecAgg+ round is four exchanges, so a training node pays it four times.
With `flower-supernode --isolation process` the SuperNode leaves running the ClientApp to us; this
process does it with Flower's own pieces (the ClientAppIo API, `pull_appinputs`, `push_appoutputs`,
Flower's app loader), one message after another in the same interpreter, so the app's modules and its
per-process cache of the client's data survive between messages:

    flower-supernode --isolation process --clientappio-api-address 127.0.0.1:9094 ... &
    fedclip-clientapp --clientappio-api-address 127.0.0.1:9094

The app is loaded from the run's FAB, as `flwr-clientapp` does; a FAB with another hash (new code)
replaces the loaded modules. It must therefore not import the app itself.

With `--approved-apps FILE` and/or `--trusted-keys FILE` (gate/pinning.py) this process first
computes the FAB's SHA-256 and runs the app only if the site approved that hash or a key it trusts
signed it; any other app is refused before any of its files is installed or imported: the reply is
an error (Flower's INVALID_FAB) naming the node and the reason, and this log says how to approve it.
Without either option any app runs (the log warns).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch  # noqa: F401 - imported once here, not per message
from flwr.app import Context, Error, Message
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode
from flwr.common.grpc import create_channel
from flwr.common.retry_invoker import make_simple_grpc_retry_invoker, wrap_stub
from flwr.common.typing import Fab, Run
from flwr.proto.appio_pb2 import ListAppsToLaunchRequest, RequestTokenRequest  # pylint: disable=E0611
from flwr.proto.clientappio_pb2_grpc import ClientAppIoStub
from flwr.supercore.heartbeat import HeartbeatSender, make_app_heartbeat_fn_grpc
from flwr.supercore.utils import get_flwr_home
from flwr.supernode.runtime.run_clientapp import pull_appinputs, push_appoutputs

from gate.pinning import SIGNATURE_KEY, AppPolicy, PolicyFileError

log = logging.getLogger("fedclip.warm")
APPROVED_DIR = "fedclip-approved"  # under FLWR_HOME: only FABs the site's policy approved are installed there
POLL_SECONDS = 0.05  # how often to ask the SuperNode for a message to handle (a local gRPC call)


def refusal(policy: AppPolicy, context: Context, run: Run, fab: Fab | None, seen: set[str]) -> tuple[str, str | None]:
    """(the FAB's SHA-256, None if this site runs it, else the error reason naming the node); logs each new hash
    once."""
    node = f"node {context.node_id} ({context.node_config.get('domain', 'no domain')})"
    if fab is None:
        return "", f"{node} refused the run: no FAB came with its message, so there is no app to check"
    name = f"{run.fab_id} {run.fab_version}"
    sha256, why = policy.problem(fab.content, str(context.run_config.get(SIGNATURE_KEY, "")), name)
    if why is not None:
        log.error("REFUSED run %d: %s", context.run_id, why)
        return sha256, f"{node} refused the app: {why}"
    if sha256 not in seen:
        seen.add(sha256)
        if policy.enforced:
            log.info("run %d: app %s with SHA-256 %s is approved: it runs", context.run_id, name, sha256)
        else:
            log.warning(
                "run %d: running app %s with SHA-256 %s unchecked (no --approved-apps or --trusted-keys)",
                context.run_id,
                name,
                sha256,
            )
    return sha256, None


def handle(stub: ClientAppIoStub, token: str, policy: AppPolicy, seen: set[str]) -> None:
    """One message, as `flwr-clientapp` handles it, in this process: errors become error replies.

    The FAB is checked against the site's policy before any of it is installed; an approved FAB is
    installed where only approved FABs go (Flower names an app's folder by 8 hex digits of its hash,
    so a folder an unchecked run left could otherwise stand in for an approved app) and loaded from there.
    """
    heartbeat = HeartbeatSender(make_app_heartbeat_fn_grpc(stub, token))
    heartbeat.start()
    t0 = time.time()
    try:
        message, context, run, fab = pull_appinputs(stub=stub, token=token)
        sha256, refused = refusal(policy, context, run, fab, seen)
        try:
            if refused is not None:
                reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=refused), reply_to=message)
            else:
                installed = install_from_fab(
                    fab.content,
                    install_dir=get_flwr_home() / APPROVED_DIR if policy.enforced else None,
                    skip_prompt=True,
                )
                app = get_load_client_app_fn(default_app_ref="", app_path=str(installed), multi_app=True)(
                    run.fab_id, run.fab_version, sha256
                )
                reply = app(message=message, context=context)
        except Exception as err:  # noqa: BLE001 - any failure of the app is the message's error reply, as in Flower
            code = (
                ErrorCode.LOAD_CLIENT_APP_EXCEPTION
                if isinstance(err, LoadClientAppError)
                else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            )
            log.exception("the ClientApp raised an exception")
            reply = Message(Error(code=code, reason=f"{type(err)}:<'{err}'>"), reply_to=message)
        push_appoutputs(stub=stub, token=token, message=reply, context=context)
        log.info(
            "handled a %s message of run %d in %.3f s", message.metadata.message_type, context.run_id, time.time() - t0
        )
    finally:
        heartbeat.stop()


def serve(address: str, policy: AppPolicy) -> None:
    """Handle the SuperNode's messages one after another, forever."""
    stub = ClientAppIoStub(create_channel(server_address=address, insecure=True))
    wrap_stub(stub, make_simple_grpc_retry_invoker())
    log.info("warm ClientApp process serving the SuperNode at %s; it runs %s", address, policy.validate())
    if not policy.enforced:
        log.warning(
            "ANY app the SuperLink sends runs here, with this site's data: whoever reaches the SuperLink's Control API "
            "chooses the code. Pass --approved-apps FILE (hashes printed by `fedclip-approve`) or --trusted-keys FILE "
            "(docs/security.md)"
        )
    seen: set[str] = set()
    while True:
        runs = stub.ListAppsToLaunch(ListAppsToLaunchRequest()).run_ids
        token = stub.RequestToken(RequestTokenRequest(run_id=runs[0])).token if runs else ""
        if token:
            handle(stub, token, policy, seen)
        else:
            time.sleep(POLL_SECONDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--clientappio-api-address",
        default="127.0.0.1:9094",
        help="the SuperNode's ClientAppIo API (its --clientappio-api-address)",
    )
    parser.add_argument(
        "--approved-apps",
        type=Path,
        metavar="FILE",
        help="run only apps whose FAB SHA-256 this file lists: one `<sha256> [name]` a line, `#` comments "
        "(`fedclip-approve APP_FOLDER` prints the line); read again at every message",
    )
    parser.add_argument(
        "--trusted-keys",
        type=Path,
        metavar="FILE",
        help=f"also run apps whose hash one of these Ed25519 keys signed (Flower's --trusted-entities YAML: "
        f"`fpk_...: 'ssh-ed25519 AAAA...'`); the signature comes with the run as run-config {SIGNATURE_KEY}",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    policy = AppPolicy(args.approved_apps, args.trusted_keys)
    try:
        policy.validate()
    except PolicyFileError as err:
        parser.exit(2, f"fedclip-clientapp: {err}\n")
    serve(args.clientappio_api_address, policy)


if __name__ == "__main__":
    main()
