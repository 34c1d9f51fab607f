"""The accuracy campaign: a declared list of long runs, each taken to completion across many sessions.

    python bench/campaign.py run --commit HEAD [--workers 2] [--root ~/fastdd-campaign]
    python bench/campaign.py status     # writes bench/results/campaign.md and prints it
    python bench/campaign.py pause      # stops every worker (SIGSTOP) while something else is timed
    python bench/campaign.py continue   # lets them go on (SIGCONT)

The code that distils is a git worktree of one commit (``ROOT/code``, made by the first ``run --commit REV``
and compiled in place), so development goes on beside the campaign and every row of one campaign comes from one
commit; a later ``run`` uses the worktree as it is (``--commit`` must then name the same commit). Each run is
``bench/accuracy.py`` of that worktree in a process of its own with one thread (``OMP_NUM_THREADS=1``),
distilling into ``ROOT/runs/NAME`` and evaluated by the protocol with 10 models; its row goes to
``bench/results/accuracy.jsonl`` of the tree this script is in, named ``run: NAME``, and its set to
``bench/results/sets/NAME.safetensors``. A run is done when its row is there; a run stopped at any point (a kill,
the end of a session) continues from its last checkpoint when ``run`` is started again. MTT's runs need the
experts job first (``fastdd experts`` into ``ROOT/experts``, resumable too).

Names say what a run is: ``fmnist-ipc1-METHOD[-PLUGIN[WEIGHT]]-itITERATIONS-sSEED``, e.g.
``fmnist-ipc1-dc-sdc-it1000-s0`` (SDC at its default weight) or ``fmnist-ipc1-idc-udd-jitter-it10-s1``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fastdd.io import atomic_write_bytes, atomic_write_json

RESULTS = Path(__file__).parent / "results"
ROOT = Path.home() / "fastdd-campaign"
MODELS = 10
EXPERTS = ("--num-experts", "5", "--epochs", "3", "--seed", "0")  # enough epochs for MTT's IPC 1 start range
# Seconds per iteration (one thread) and per evaluation of 10 models with random-real, until a run measures its own.
GUESS = {"dc": (6.0, 600), "dsa": (7.0, 1200), "mtt": (8.0, 1200), "idc": (300.0, 1200), "experts": (600.0, 0)}


@dataclass(frozen=True)
class Run:
    """One run of the campaign: ``method`` with ``options`` (of ``fastdd distill``) for ``iterations`` at ``seed``.
    ``plugin`` is the name's plug-in part ("" for none, "sdc" for SDC at its default weight, "sdc3", ...)."""

    method: str
    iterations: int
    seed: int
    plugin: str = ""
    options: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        if self.method == "experts":
            return "fmnist-experts"
        plugin = f"-{self.plugin}" if self.plugin else ""
        return f"fmnist-ipc1-{self.method}{plugin}-it{self.iterations}-s{self.seed}"

    def command(self, code: Path, root: Path, results: Path) -> list[str]:
        if self.method == "experts":
            return [sys.executable, "-m", "fastdd.cli", "experts", "--dataset", "fashion-mnist",
                    "--out", str(root / "experts"), "--quiet", *EXPERTS]
        experts = ("--experts", str(root / "experts")) if self.method == "mtt" else ()
        return [sys.executable, str(code / "bench" / "accuracy.py"), "--method", self.method,
                "--iterations", str(self.iterations), "--models", str(MODELS), "--seed", str(self.seed),
                "--name", self.name, "--results", str(results), "--out", str(root / "runs" / self.name),
                "--quiet", *experts, *self.options]


def declared() -> list[Run]:
    """The campaign, in the order it runs: each seed's pair one after the other, so pairs complete early."""
    sdc = ("--plugin", "sdc")
    runs = []
    for seed in (0, 1, 2):  # 1. DC and DSA at their budget, without and with SDC at its default weight
        for method in ("dc", "dsa"):
            runs += [Run(method, 1000, seed), Run(method, 1000, seed, "sdc", sdc)]
    runs.append(Run("experts", 0, 0))  # 3. MTT, SDC at a tenth of its default weight (0.002 / IPC)
    for seed in (0, 1):
        runs += [Run("mtt", 1000, seed), Run("mtt", 1000, seed, "sdc0.0002", (*sdc, "--sdc-lambda", "0.0002"))]
    for seed in (0, 1):  # 4. IDC at 10 outer iterations, without UDD and with each mining policy
        runs += [Run("idc", 10, seed)] + [
            Run("idc", 10, seed, f"udd-{policy}", ("--plugin", "udd", "--udd-policy", policy))
            for policy in ("jitter", "response")]
    runs += [Run("idc", budget, 0) for budget in (1, 2, 5)]  # IDC's accuracy against its budget
    for weight in ("3", "30"):  # 2. DC at other SDC weights (run last: wanted if the default shows no gain)
        runs += [Run("dc", 1000, seed, f"sdc{weight}", (*sdc, "--sdc-lambda", weight)) for seed in (0, 1, 2)]
    return runs


def rows(results: Path) -> dict[str, dict]:
    """The campaign's rows in ``results/accuracy.jsonl`` by run name (the newest of a name)."""
    path = results / "accuracy.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return {row["run"]: row for row in map(json.loads, filter(None, lines)) if "run" in row}


def finished(run: Run, root: Path, results: Path) -> bool:
    if run.method == "experts":
        return (root / "experts" / "done").exists()
    return run.name in rows(results)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def paused(pid: int) -> bool:
    """Whether process ``pid`` is stopped (``pause``'s SIGSTOP), from /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


def runner_pid(root: Path) -> int | None:
    """The pid of the runner working on ``root``, None when none is."""
    try:
        pid = json.loads((root / "runner.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None
    return pid if alive(pid) else None


def prepare_code(root: Path, rev: str) -> Path:
    """``ROOT/code``: a worktree of ``rev`` with its C++ extensions compiled in place (made once)."""
    code = root / "code"
    repo = Path(__file__).resolve().parent.parent
    wanted = subprocess.run(["git", "rev-parse", rev], cwd=repo, capture_output=True, text=True, check=True).stdout
    if not code.exists():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(code), wanted.strip()], cwd=repo, check=True)
    pinned = subprocess.run(["git", "rev-parse", "HEAD"], cwd=code, capture_output=True, text=True).stdout
    if pinned.strip() != wanted.strip():
        raise SystemExit(f"commit (--commit): {code} is pinned at {pinned.strip()[:10]}, not {wanted.strip()[:10]}; "
                         "finish that campaign or give it another --root")
    if not (code / ".built").exists():
        for folder in ("kernels", "csrc"):  # the installed layout (setup.py's package_dir), so that no part of the
            (code / "fastdd" / folder).symlink_to(Path("..", folder))  # package is looked up in another tree
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=code, check=True)
        (code / ".built").touch()
    return code


def run(args: argparse.Namespace) -> None:
    root, results = args.root.expanduser(), args.results
    if runner_pid(root) is not None:
        raise SystemExit(f"root (--root): a runner (pid {runner_pid(root)}) is already working on {root}")
    code = prepare_code(root, args.commit)
    if os.getpgrp() != os.getpid():
        os.setpgrp()  # the runner and its workers form one group, which pause and continue signal
    atomic_write_json(root / "runner.json", {"pid": os.getpid(), "workers": args.workers})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(code)}
    (root / "logs").mkdir(exist_ok=True)
    pending = [r for r in declared() if not finished(r, root, results) and args.only in r.name]
    working: dict[str, subprocess.Popen] = {}
    while pending or working:
        for name, proc in list(working.items()):
            if proc.poll() is not None:
                del working[name]
                if name == Run("experts", 0, 0).name and proc.returncode == 0:  # its command exits 0 when complete
                    (root / "experts" / "done").touch()
                print(f"{name}: exited {proc.returncode} (log: {root / 'logs' / name}.log)", flush=True)
                write_status(root, results)
        ready = [r for r in pending if r.method != "mtt" or finished(Run("experts", 0, 0), root, results)]
        while ready and len(working) < args.workers:
            job = ready.pop(0)
            pending.remove(job)
            with open(root / "logs" / f"{job.name}.log", "ab") as log:
                working[job.name] = subprocess.Popen(job.command(code, root, results), cwd=code, env=env,
                                                     stdout=log, stderr=subprocess.STDOUT)
            print(f"{job.name}: started", flush=True)
        if not ready and not working:
            break
        time.sleep(10)
    write_status(root, results)


def seconds_per_iteration(run_dir: Path) -> float | None:
    """Median seconds between consecutive iterations in a run's metrics (None before two lines)."""
    try:
        seconds = [json.loads(line)["seconds"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError, KeyError):
        return None
    steps = [b - a for a, b in zip(seconds, seconds[1:]) if b > a]  # a resumed process starts its clock again
    return statistics.median(steps) if steps else None


def iterations_done(run_dir: Path) -> int:
    try:
        return sum(1 for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip())
    except OSError:
        return 0


def write_status(root: Path, results: Path) -> str:
    """The table of ``bench/results/campaign.md``: each run done, running or remaining, and the hours left."""
    done = rows(results)
    measured: dict[tuple[str, str], list[float]] = {}
    evaluated: dict[str, list[float]] = {}
    for r in declared():
        pace = seconds_per_iteration(root / "runs" / r.name)
        if pace is not None:
            measured.setdefault((r.method, r.plugin), []).append(pace)
        if r.name in done:
            evaluated.setdefault(r.method, []).append(done[r.name]["eval_seconds"])
    pid = runner_pid(root)
    runner = "stopped" if pid is None else "paused" if paused(pid) else "running"
    lines, left = [], 0.0
    for r in declared():
        guess_pace, guess_eval = GUESS[r.method]
        pace = statistics.median(measured.get((r.method, r.plugin), [guess_pace]))
        evaluation = statistics.median(evaluated.get(r.method, [guess_eval]))
        if r.method == "experts":
            state = "done" if finished(r, root, results) else "remaining"
            remaining = 0.0 if state == "done" else guess_pace * 5
        elif r.name in done:
            row = done[r.name]
            state = f"done: {100 * row['distilled']['mean']:.2f} +- {100 * row['distilled']['std']:.2f}"
            remaining = 0.0
        else:
            count = iterations_done(root / "runs" / r.name)
            state = f"{'started' if count else 'remaining'}: {count}/{r.iterations}"
            remaining = (r.iterations - count) * pace + evaluation
        left += remaining
        lines.append(f"| {r.name} | {state} | {pace:.1f} | {remaining / 3600:.2f} |\n")
    workers = json.loads((root / "runner.json").read_text())["workers"] if (root / "runner.json").exists() else 1
    table = (f"Accuracy campaign (`python bench/campaign.py status`), {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
             f"runner {runner}; {left / 3600:.1f} worker-hours left, "
             f"{left / 3600 / workers:.1f} h with {workers} worker(s). Seconds per iteration are measured (median of "
             "the method's runs with the same plug-in) where a run has started, guessed before.\n\n"
             "| run | state | s / iteration | hours left |\n|---|---|---|---|\n" + "".join(lines))
    atomic_write_bytes(results / "campaign.md", table.encode())
    return table


def signal_workers(root: Path, sig: signal.Signals) -> None:
    pid = runner_pid(root)
    if pid is None:
        raise SystemExit(f"root (--root): no runner is working on {root}")
    os.killpg(os.getpgid(pid), sig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("run", "status", "pause", "continue"))
    p.add_argument("--root", type=Path, default=ROOT, help=f"runs, experts, logs and the worktree (default {ROOT})")
    p.add_argument("--results", type=Path, default=RESULTS, help=f"where rows and sets go (default {RESULTS})")
    p.add_argument("--commit", default="HEAD", help="run: the commit the campaign's code is pinned at (default HEAD)")
    p.add_argument("--workers", type=int, default=2, help="run: runs at once, one thread each (default 2)")
    p.add_argument("--only", default="", help="run: only the runs whose name holds this text")
    args = p.parse_args()
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if args.action == "run":
        run(args)
    elif args.action == "status":
        print(write_status(args.root.expanduser(), args.results), end="")
    else:
        signal_workers(args.root.expanduser(), signal.SIGSTOP if args.action == "pause" else signal.SIGCONT)


if __name__ == "__main__":
    main()
