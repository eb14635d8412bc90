"""What each message costs a deployed SuperNode before any training: Flower 1.28 starts a fresh
`flwr-clientapp` process per message, which imports Flower, PyTorch and the app and loads the
node's cached features again (in simulation the same process serves every round).

    python benchmarks/clientapp_start.py               # the demo's photo domain, 5 fresh processes
    python benchmarks/clientapp_start.py --repeats 10 --domain sketch

Prints, per fresh process, the wall and CPU seconds of the imports and of `load_local_data`
(configuration, data listing, model fingerprint, features from the disk cache). Builds the demo
first if it is not in the cache (FEDCLIP_CACHE).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PROBE = """
import json, os, sys, time
t0, c0 = time.time(), time.process_time()
import flwr.clientapp
from flwr.app import Context, RecordDict
from client_app.app import load_local_data
t1, c1 = time.time(), time.process_time()
context = Context(run_id=1, node_id=1, node_config={"domain": sys.argv[1], "device": "cpu"}, state=RecordDict(), run_config={"overrides": ""})
local = load_local_data(context)
t2, c2 = time.time(), time.process_time()
print(json.dumps({"import_wall": t1 - t0, "import_cpu": c1 - c0, "load_wall": t2 - t1, "load_cpu": c2 - c1, "images": len(local.feats.labels)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--domain", default="photo")
    args = parser.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", PROBE, args.domain], env=env, check=True, capture_output=True)  # builds/caches once
    print(f"load average before: {os.getloadavg()[0]:.2f} (on {os.cpu_count()} CPUs)")
    rows = []
    for i in range(args.repeats):
        t0 = time.time()
        out = subprocess.run([sys.executable, "-c", PROBE, args.domain], env=env, check=True, capture_output=True, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1]) | {"process_wall": time.time() - t0}
        rows.append(row)
        print(f"process {i}: imports {row['import_wall']:.2f} s wall / {row['import_cpu']:.2f} s CPU, "
              f"load_local_data {row['load_wall']:.2f} s / {row['load_cpu']:.2f} s CPU ({row['images']} images), "
              f"whole process {row['process_wall']:.2f} s")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("import_cpu", "load_cpu", "process_wall")}
    print(f"mean: {mean['import_cpu']:.2f} s CPU imports + {mean['load_cpu']:.2f} s CPU load_local_data; "
          f"{mean['process_wall']:.2f} s wall per fresh process; load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
