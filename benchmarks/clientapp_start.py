"""What a message costs a deployed SuperNode whose Flower (1.28) starts a fresh `flwr-clientapp`
process per message: imports, building the client's data from the disk caches, and the message's
work, against a bare `python -c "import flwr.clientapp, torch"` measured in the same run.

    python benchmarks/clientapp_start.py               # the demo's photo domain, 5 fresh processes each
    python benchmarks/clientapp_start.py --repeats 10 --domain sketch --method evaluate

Each probe process handles one real message (a round-2 train message carrying the evaluation of
the adapter it brings, or an evaluate message) through the ClientApp, as `flwr-clientapp` does,
and prints its wall and CPU seconds per phase and which heavy packages it imported. Builds the demo
and its feature cache first if they are not in the cache (FEDCLIP_CACHE).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

BARE = "import flwr.clientapp, torch"
PROBE = """
import json, sys, time
t0, c0 = time.time(), time.process_time()
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from client_app.app import app
from common.fingerprint import app_code_fingerprint
from common.model import AttentionAdapter
t1, c1 = time.time(), time.process_time()
domain, kind, run_config = sys.argv[1], sys.argv[2], sys.stdin.read()
config = {"run-config": run_config, "app-code": app_code_fingerprint(), "server-round": 2, "evaluate-round": 1}
config = ConfigRecord({**config, "zero-shot": False})
message_type = MessageType.TRAIN if kind == "train" else MessageType.EVALUATE
arrays = ArrayRecord(AttentionAdapter(64).state_dict())
message = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=1, message_type=message_type)
message.metadata.__dict__["_message_id"] = "probe"
node_config = {"domain": domain, "data-dir": "demo", "device": "cpu"}
context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
reply = app(message, context)
t2, c2 = time.time(), time.process_time()
assert not reply.has_error(), reply.error
libraries = ("transformers", "datasets", "flwr_datasets", "sklearn", "skimage", "matplotlib", "hydra")
heavy = [m for m in libraries if m in sys.modules]
times = {"import_wall": t1 - t0, "import_cpu": c1 - c0, "handle_wall": t2 - t1, "handle_cpu": c2 - c1}
print(json.dumps({**times, "heavy": heavy}))
"""


def timed(args: list[str], stdin: str = "") -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, stdout) of a fresh Python process; CPU seconds hardly depend on the machine's
    load."""
    t0, c0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [sys.executable, *args],
        input=stdin,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        check=True,
        capture_output=True,
        text=True,
    )
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.time() - t0, c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime, out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--domain", default="photo")
    parser.add_argument("--method", choices=["train", "evaluate"], default="train")
    args = parser.parse_args()
    from common.config import load_config, message_config

    run_config = message_config(load_config())
    timed(["-c", PROBE, args.domain, args.method], run_config)  # builds the demo and the feature cache once
    print(f"load average before: {os.getloadavg()[0]:.2f} (on {os.cpu_count()} CPUs)")
    bare, probes = [], []
    for i in range(args.repeats):  # interleaved, so that both see the same load
        bare.append(timed(["-c", BARE])[:2])
        wall, cpu, out = timed(["-c", PROBE, args.domain, args.method], run_config)
        row = json.loads(out.strip().splitlines()[-1]) | {"process_wall": wall, "process_cpu": cpu}
        probes.append(row)
        print(
            f"process {i}: bare imports {bare[-1][0]:.2f} s ({bare[-1][1]:.2f} s CPU); ClientApp process {wall:.2f} "
            f"s ({cpu:.2f} s CPU; "
            f"imports {row['import_wall']:.2f} s wall / "
            f"{row['import_cpu']:.2f} s CPU, {args.method} message {row['handle_wall']:.2f} s "
            f"/ {row['handle_cpu']:.2f} s CPU); "
            f"heavy packages imported: {', '.join(row['heavy']) or 'none'}"
        )
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    process, floor = mean([r["process_wall"] for r in probes]), mean([b[0] for b in bare])
    process_cpu, floor_cpu = mean([r["process_cpu"] for r in probes]), mean([b[1] for b in bare])
    print(
        f"mean: {process:.2f} s ({process_cpu:.2f} s CPU) per fresh ClientApp process handling a {args.method} "
        f"message, "
        f'{floor:.2f} s ({floor_cpu:.2f} s CPU) for a bare `python -c "{BARE}"`: {process / floor:.2f}x wall, '
        f"{process_cpu / floor_cpu:.2f}x CPU; load average after: {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
