"""A warm ClientApp process for a deployed SuperNode: imports once, keeps each client's world between messages.

Flower 1.28's SuperNode (default `--isolation subprocess`) starts a fresh `flwr-clientapp` process for
every message: 4-5 s of imports and a rebuild of the client's data each time. The ServerApp does one
exchange a round (server_app/app.py), so a node gets at most one message a round (besides the discovery
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
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch  # noqa: F401 - imported once here, not per message
from flwr.app import Error, Message
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode
from flwr.common.grpc import create_channel
from flwr.common.retry_invoker import make_simple_grpc_retry_invoker, wrap_stub
from flwr.proto.appio_pb2 import ListAppsToLaunchRequest, RequestTokenRequest  # pylint: disable=E0611
from flwr.proto.clientappio_pb2_grpc import ClientAppIoStub
from flwr.supercore.heartbeat import HeartbeatSender, make_app_heartbeat_fn_grpc
from flwr.supernode.runtime.run_clientapp import pull_appinputs, push_appoutputs

log = logging.getLogger("fedclip.warm")
POLL_SECONDS = 0.05  # how often to ask the SuperNode for a message to handle (a local gRPC call)


def handle(stub: ClientAppIoStub, token: str, load_client_app) -> None:
    """One message, as `flwr-clientapp` handles it, in this process: errors become error replies."""
    heartbeat = HeartbeatSender(make_app_heartbeat_fn_grpc(stub, token))
    heartbeat.start()
    t0 = time.time()
    try:
        message, context, run, fab = pull_appinputs(stub=stub, token=token)
        try:
            if fab:
                install_from_fab(fab.content, skip_prompt=True)
            app = load_client_app(run.fab_id, run.fab_version, fab.hash_str if fab else "")
            reply = app(message=message, context=context)
        except Exception as err:  # noqa: BLE001 - any failure of the app is the message's error reply, as in Flower
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(err, LoadClientAppError) else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            log.exception("the ClientApp raised an exception")
            reply = Message(Error(code=code, reason=f"{type(err)}:<'{err}'>"), reply_to=message)
        push_appoutputs(stub=stub, token=token, message=reply, context=context)
        log.info("handled a %s message of run %d in %.3f s", message.metadata.message_type, context.run_id, time.time() - t0)
    finally:
        heartbeat.stop()


def serve(address: str) -> None:
    """Handle the SuperNode's messages one after another, forever."""
    stub = ClientAppIoStub(create_channel(server_address=address, insecure=True))
    wrap_stub(stub, make_simple_grpc_retry_invoker())
    load_client_app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    log.info("warm ClientApp process serving the SuperNode at %s", address)
    while True:
        runs = stub.ListAppsToLaunch(ListAppsToLaunchRequest()).run_ids
        token = stub.RequestToken(RequestTokenRequest(run_id=runs[0])).token if runs else ""
        if token:
            handle(stub, token, load_client_app)
        else:
            time.sleep(POLL_SECONDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clientappio-api-address", default="127.0.0.1:9094",
                        help="the SuperNode's ClientAppIo API (its --clientappio-api-address)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # the app comes from the run's FAB: forget this package, so that its `client_app` is the one imported
    for name in [m for m in sys.modules if m == "client_app" or m.startswith("client_app.")]:
        del sys.modules[name]
    serve(args.clientappio_api_address)


if __name__ == "__main__":
    main()
