"""Leave-one-domain-out sweep: one real `flwr run` per method, held-out domain and seed, then the table.

    python -m benchmarks.sweep "dataset.domains=[photo,sketch,cartoon] training.rounds=2 sweep.seeds=[0,1]"

Overrides under `sweep.` (conf/config.yaml) set the sweep; every other override goes to every run.
Each run lands in <out_dir>/runs/<method>/<held_out>/seed<k>/. A run with a summary.json is done and
skipped when the command is repeated; a run stopped half-way is deleted and done again, so an
interrupted sweep resumes by running the same command. A failed run is recorded (failure.json, its
log) and the sweep goes on. Writes <out_dir>/table.md, table.csv, plots/*.png and sweep.json.
With tracking.mlflow_uri among the overrides, every run goes to one MLflow experiment named by <out_dir>.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from flwr.cli.constant import LOCAL_CONTROL_API_ADDRESS
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from benchmarks.sweep_report import FAILURE_FILE, LOG_FILE, Run, read_run, write_plots, write_tables
from common.config import CONF_DIR, load_config, split_overrides
from common.data import dataset_domains
from common.features import duration

REPO = Path(__file__).resolve().parent.parent
# Ray's own failures: its GCS server or raylet not starting (the cause we found, a crash of the forked child with
# grpcio >= 1.80, is pinned away in pyproject.toml: docs/first-run.md), or its node lost on a busy machine; the run
# then fails or hangs (a round waits strategy.round_timeout), so the run is stopped and started again.
RAY_FAILURES = (
    "logs/gcs_server.err'",
    "The raylet exited immediately",
    "marked dead because the detector has missed",
    "The current node timed out during startup",
)
SWEPT_KEYS = {"dataset.held_out": "sweep.held_out", "seed": "sweep.seeds", "method": "sweep.methods"}


# ---------------------------------------------------------------- one `flwr run`


def _local_superlinks(flwr_home: Path) -> list[int]:
    """PIDs of the local SuperLink that `flwr run` started for this FLWR_HOME."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if "flower-superlink" in cmd and str(flwr_home) in cmd:
            pids.append(int(proc.name))
    return pids


def _stop(pids: list[int], wait: float = 15.0) -> None:
    """Stop each process group, and wait until they are gone so the SuperLink's port is free again."""
    for pid in pids:
        try:
            os.killpg(os.getpgid(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + wait
    while (
        alive := [p for p in pids if Path(f"/proc/{p}").exists() and "zombie" not in _proc_state(p)]
    ) and time.time() < deadline:
        time.sleep(0.2)
    for pid in alive:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def _control_port_busy() -> bool:
    host, port = LOCAL_CONTROL_API_ADDRESS.rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, int(port))) == 0


def _wait_for_free_control_port(wait: float = 30.0) -> None:
    """`flwr run` reuses any SuperLink already on the local port, which would run with another
    process's environment (its FEDCLIP_OUTPUTS): refuse instead."""
    deadline = time.time() + wait
    while _control_port_busy():
        if time.time() > deadline:
            raise RuntimeError(
                f"a SuperLink already listens on {LOCAL_CONTROL_API_ADDRESS} (another `flwr run`?). Stop it first "
                "(find it with `pgrep -af flower-superlink`); runs of this sweep start their own."
            )
        time.sleep(1)


def _watch(proc: subprocess.Popen, log: Path, timeout: float | None) -> tuple[int, str | None]:
    """Wait for `flwr run`; stop waiting when Ray reports one of its failures or the timeout passes.
    Returns (exit code, 124 on timeout, -1 on a Ray failure; the Ray failure seen or None)."""
    deadline = None if timeout is None else time.time() + timeout
    with open(log, errors="replace") as fh:
        seen = ""
        while proc.poll() is None:
            seen = seen[-200:] + fh.read()  # only what is new, plus a tail for a message split across reads
            if failure := next((f for f in RAY_FAILURES if f in seen), None):
                return -1, failure
            if deadline is not None and time.time() > deadline:
                return 124, None
            time.sleep(2)
        seen = seen[-200:] + fh.read()
    return proc.returncode, next((f for f in RAY_FAILURES if f in seen), None)


def flwr_run(
    folder: Path,
    overrides: str = "",
    num_supernodes: int = 4,
    client_cpus: float = 1,
    client_gpus: float = 0,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    attempts: int = 3,
    app: Path = REPO,
    run_config: str | None = None,
) -> tuple[int, str]:
    """One `flwr run` of this app (or of the Flower app in `app`, with `run_config` as its --run-config) in
    `folder` (new or empty): outputs (FEDCLIP_OUTPUTS), a private FLWR_HOME and the log (flwr.log) all go there;
    the SuperLink it starts is stopped afterwards. Returns (exit code, log).

    Only Ray's own failures (RAY_FAILURES in the log) are retried, each time in an emptied folder."""
    folder = folder.resolve()
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{folder} is not empty; a run needs a folder of its own")
    if '"' in overrides:
        raise ValueError(f"overrides {overrides!r} contain a double quote; quote Hydra values with single quotes")
    bin_dir = Path(sys.executable).parent  # flwr starts flower-superlink from PATH
    federation = f"num-supernodes={num_supernodes} client-resources-num-cpus={client_cpus}"
    if client_gpus:
        federation += f" client-resources-num-gpus={client_gpus}"
    command = [str(bin_dir / "flwr"), "run", str(app), "--stream", "--federation-config", federation]
    if overrides:
        run_config = 'overrides="{}"'.format(overrides.replace("\\", "\\\\"))
    if run_config:
        command += ["--run-config", run_config]
    logs = []
    for attempt in range(1, attempts + 1):
        shutil.rmtree(folder, ignore_errors=True)  # new or empty at first; a failed start's leftovers after
        folder.mkdir(parents=True)
        _wait_for_free_control_port()
        run_env = dict(
            os.environ,
            **(env or {}),
            FLWR_HOME=str(folder / "flwr-home"),
            FEDCLIP_OUTPUTS=str(folder),
            PATH=f"{bin_dir}:{os.environ['PATH']}",
        )
        header = f"# attempt {attempt}: {shlex.join(command)}\n"
        try:
            with open(folder / LOG_FILE, "w") as fh:
                fh.write(header)
                fh.flush()
                proc = subprocess.Popen(
                    command, env=run_env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
                )
                try:
                    code, ray_failed = _watch(proc, folder / LOG_FILE, timeout)
                finally:
                    if proc.poll() is None:
                        _stop([proc.pid])
                if code == 124:
                    fh.write(f"\n# stopped: still running after {timeout} s\n")
        finally:
            _stop(_local_superlinks(folder / "flwr-home"))
        logs.append((folder / LOG_FILE).read_text())
        if not ray_failed:
            break
        print(f"  attempt {attempt}: Ray failed ({ray_failed!r} in the log); starting the run again", flush=True)
    if len(logs) > 1:  # keep every attempt's log
        (folder / LOG_FILE).write_text("".join(logs))
    return code, "".join(logs)


# ---------------------------------------------------------------- the sweep


def hydra_value(value: str) -> str:
    """A domain name as a Hydra override value: quoted when it holds spaces or other syntax."""
    return value if re.fullmatch(r"[\w.\-/]+", value) else "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def run_overrides(base: list[str], method: str, held_out: str, seed: int) -> str:
    """A run's overrides: the sweep's shared ones, then held-out domain, seed and method (fedclip is the default)."""
    swept = [f"dataset.held_out={hydra_value(held_out)}", f"seed={seed}"] + (
        [f"method={method}"] if method != "fedclip" else []
    )
    return " ".join(base + swept)


def shared_experiment(base: list[str], out_dir: Path) -> list[str]:
    """The overrides with every run of the sweep in one MLflow experiment (tracking.mlflow_uri), named by the
    sweep's folder,
    unless they name one themselves."""
    if any(o.lstrip("+~").startswith("tracking.mlflow_experiment=") for o in base):
        return base
    return [*base, f"tracking.mlflow_experiment={hydra_value(str(out_dir))}"]


def plan(overrides: list[str]) -> tuple[DictConfig, list[str], list[str], int]:
    """The sweep settings, the overrides every run shares, the held-out domains and the clients per run;
    checks the overrides and method names before any run starts."""
    base = [o for o in overrides if not o.lstrip("+~").startswith("sweep.")]
    for o in base:
        key = o.lstrip("+~").split("=", 1)[0]
        if key in SWEPT_KEYS:
            raise ValueError(f"{o!r}: the sweep sets {key} for each run; use {SWEPT_KEYS[key]}=[...] instead")
    cfg = load_config(overrides, complete=False)  # each run's held-out domain is the sweep's
    sweep = cfg.sweep
    domains = dataset_domains(cfg, require_held_out=False)
    held_outs = list(sweep.held_out) if sweep.held_out is not None else domains
    unknown = [d for d in held_outs if d not in domains]
    if unknown:
        raise ValueError(f"sweep.held_out {unknown} not among the run's domains {domains}")
    available = {p.stem for p in (CONF_DIR / "method").glob("*.yaml")} | {"fedclip"}
    unknown = [m for m in sweep.methods if m not in available]
    if unknown:
        raise ValueError(f"sweep.methods {unknown} unknown; valid: {', '.join(sorted(available))} (conf/method/)")
    if not sweep.methods or not sweep.seeds or not held_outs:
        raise ValueError("sweep.methods, sweep.seeds and sweep.held_out must not be empty")
    for method in sweep.methods:  # a typo in an override fails here, not in every run
        load_config(run_overrides(base, method, held_outs[0], sweep.seeds[0]))
    clients = len(domains) * int(cfg.dataset.get("clients_per_domain", 1))
    return sweep, base, held_outs, clients


EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception)(?:\(\w+\))?: .+")
GENERIC_ERRORS = ("Exception in ServerApp thread",)  # Flower's wrapper around the real error


def failure_reason(log: str) -> str:
    """The last exception a failed run's log names (the ServerApp's), or its last line."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in log.splitlines()]
    errors = [line for line in lines if EXCEPTION_LINE.match(line) and not any(g in line for g in GENERIC_ERRORS)]
    return (errors or [line for line in lines if line] or ["empty log"])[-1][:300]


def main(argv: list[str]) -> int:
    overrides = [o for arg in argv for o in split_overrides(arg)]
    sweep, base, held_outs, clients = plan(overrides)
    out_dir = Path(sweep.out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    base = shared_experiment(base, out_dir)
    methods, seeds = list(sweep.methods), [int(s) for s in sweep.seeds]
    cells = [(m, d, s) for m in methods for d in held_outs for s in seeds]
    print(
        f"sweep: {len(methods)} method(s) {methods} x {len(held_outs)} held-out domain(s) {held_outs} x "
        f"{len(seeds)} seed(s) {seeds} = {len(cells)} runs, {clients} clients each; folder {out_dir}",
        flush=True,
    )

    start, launched, not_started, durations = time.time(), 0, 0, []

    def write_outputs() -> list[Run]:
        runs = [read_run(out_dir, m, d, s) for m, d, s in cells]
        write_tables(out_dir, runs, methods, held_outs, seeds)
        plots = write_plots(out_dir, runs, methods, held_outs)
        index = {
            "overrides": base,
            "methods": methods,
            "held_out": held_outs,
            "seeds": seeds,
            "clients_per_run": clients,
            "settings": OmegaConf.to_container(sweep),
            "table_md": str(out_dir / "table.md"),
            "table_csv": str(out_dir / "table.csv"),
            "plots": [str(p) for p in plots],
            "runs": [
                {
                    "method": r.method,
                    "held_out": r.held_out,
                    "seed": r.seed,
                    "status": r.status,
                    "folder": str(r.dir),
                    "log": str(r.log),
                    "run_folder": r.summary.get("run_folder"),
                    "failure": r.failure or None,
                    "overrides": run_overrides(base, r.method, r.held_out, r.seed),
                }
                for r in runs
            ],
        }
        (out_dir / "sweep.json").write_text(json.dumps(index, indent=2) + "\n")
        return runs

    try:
        for i, (method, held_out, seed) in enumerate(cells, 1):
            name = f"run {i}/{len(cells)}: method={method} held_out={held_out} seed={seed}"
            run = read_run(out_dir, method, held_out, seed)
            if run.status == "done":
                print(f"{name}: done before, skipped ({run.dir})", flush=True)
                continue
            if sweep.max_runs is not None and launched >= sweep.max_runs:
                not_started += 1
                continue
            redo = {"failed": " (failed before: redone)", "incomplete": " (stopped half-way before: redone)"}.get(
                run.status, ""
            )
            print(f"{name}{redo} ... log {run.log}", flush=True)
            shutil.rmtree(run.dir, ignore_errors=True)
            t0 = time.time()
            code, log = flwr_run(
                run.dir,
                run_overrides(base, method, held_out, seed),
                clients,
                sweep.client_cpus,
                sweep.client_gpus,
                timeout=sweep.run_timeout,
            )
            launched += 1
            durations.append(time.time() - t0)
            run = read_run(out_dir, method, held_out, seed)
            if run.status == "done":
                # Flower's own state; kept only for failed runs
                shutil.rmtree(run.dir / "flwr-home", ignore_errors=True)
                result = f"held-out {100 * (run.generalization or 0):.2f}%"
                if run.personalization is not None:
                    result += f", personalization {100 * run.personalization:.2f}%"
            elif run.status == "failed":  # the app stopped it: its summary.json says why
                result = f"FAILED ({run.failure['reason']}); log {run.log}"
            else:
                reason = f"no summary.json (flwr run exit code {code}): {failure_reason(log)}"
                (run.dir / FAILURE_FILE).write_text(
                    json.dumps({"reason": reason, "returncode": code, "log": str(run.log)}, indent=2)
                )
                result = f"FAILED ({reason}); log {run.log}"
            todo = sum(read_run(out_dir, *c).status != "done" for c in cells)
            if sweep.max_runs is not None:
                todo = min(todo, sweep.max_runs - launched)
            eta = sum(durations) / len(durations) * todo
            print(
                f"{name}: {result} in {durations[-1]:.0f} s; elapsed {duration(time.time() - start)}, "
                f"ETA {duration(eta)} for {todo} more",
                flush=True,
            )
            write_outputs()
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume (finished runs are kept)", flush=True)
        return 130
    finally:
        runs = write_outputs()
    if not_started:
        print(f"{not_started} run(s) not started (sweep.max_runs={sweep.max_runs}): run again to go on", flush=True)
    counts = {s: sum(r.status == s for r in runs) for s in ("done", "failed", "incomplete", "pending")}
    print(
        f"sweep: {counts['done']}/{len(runs)} done, {counts['failed']} failed, "
        f"{counts['pending'] + counts['incomplete']} not run, in {duration(time.time() - start)}"
    )
    print(f"table: {out_dir / 'table.md'} and table.csv; plots: {out_dir / 'plots'}; index: {out_dir / 'sweep.json'}")
    print((out_dir / "table.md").read_text())
    return 0 if counts["failed"] == 0 else 1


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (
        ValueError,
        FileNotFoundError,
        RuntimeError,
        HydraException,
    ) as err:  # bad overrides or data: say what, not where
        sys.exit(f"sweep: {err}")
