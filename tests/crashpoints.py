"""The write-point crash harness (issue 34): a command cut at any of its write points, then run again, must end
with the files of an uninterrupted run.

Every write fastdd keeps passes :func:`fastdd.io.write_point` (stages "create", "data", "rename", "renamed",
"append", "remove"). For a scenario (a command and the folder it writes, WORK/case) the harness

1. runs the command once with ``write_point`` hooked: it lists every point passed (path relative to the case
   folder, stage), and at each one a forked copy of the process is killed (``os._exit(137)``: nothing flushed,
   no handler run) and, once it is dead, the case folder, as the kill left it, is copied aside (a process
   killed, not a machine losing power: what was written before the kill is there). The folder at the end is
   the reference result;
2. cuts it at every point k in a second way, a full disk: on a fresh case folder the command runs with
   ``OSError(ENOSPC)`` raised at point k (at the stages a full disk fails: "create", "data", "rename",
   "append"); it must end with exit status 1 and one line on stderr naming the file;
3. after each cut, runs the scenario's rerun command on the folder the cut left: the natural next step, the
   same command, but ``fastdd distill --resume`` once config.json exists. The rerun must exit 0, or 1 with
   one line pointing to --overwrite when the cut run had already finished its result (a report renamed into
   place just before the kill, which a rerun does not replace unasked); the folder's files must then be the
   reference's: the same names (no temporary file or partial checkpoint left) and the same bytes, but for the
   wall times ("seconds") in JSON and JSON-lines files and the lock file a kill leaves (the next command that
   writes there takes it over).

Every file the command writes or changes must have passed a write point (been written through fastdd.io).

A rerun depends only on the folder it starts from, so a folder already rerun (the temporary files' random names
aside) is not rerun again. Every run is a fork of a worker that has imported fastdd and run the command once
(and made ``fastdd distill``'s memory plan, which writes nothing, once: :func:`_plan_once`); :data:`WORKERS`
scenarios run at once. Adding a command (``fastdd cache``, say) is adding a :class:`Scenario` to
:data:`SCENARIOS`: the argv writing under WORK/case, what it needs made first (``prepare``: a function writing
WORK/initial, the case's starting contents, or WORK/inputs, read only) and how it is rerun.

``python tests/crashpoints.py harness WORK NAME...`` runs the scenarios named (in the empty folder WORK) and prints
one JSON line per scenario (``tests/interface/test_crash_points.py``). ``python tests/crashpoints.py pause K ARGV...``
runs ``fastdd ARGV`` and stops at its K-th write point (0-based): it prints "paused" and goes on after a line on stdin
(``tests/runtime/test_lock.py`` holds a folder with it).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENOSPC_STAGES = ("create", "data", "rename", "append")  # the stages a full disk can fail
KILLED = 137
WORKERS = 2  # scenarios run at once

DISTILL = ["distill", "--dataset", "digits", "--method", "dc", "--ipc", "1", "--iterations", "2", "--batch-real",
           "8", "--model", "ConvNetW32", "--checkpoint-every", "1", "--eval-models", "1", "--eval-epochs", "1",
           "--eval-model", "ConvNetW32", "--no-baseline", "--device", "cpu", "--quiet"]
EXPERTS = ["experts", "--dataset", "digits", "--num-experts", "2", "--epochs", "2", "--model", "ConvNetW32",
           "--batch-size", "512", "--device", "cpu", "--quiet"]


@dataclass(frozen=True)
class Scenario:
    """A command the harness cuts, each part a function of the work folder WORK. ``argv``: the command, writing
    under WORK/case, which every run starts as a copy of WORK/initial (empty unless ``prepare`` fills it);
    ``rerun``: the command run after a cut (default ``argv``); ``prepare``: run once first, it writes WORK/initial
    or WORK/inputs (what the command only reads), e.g. with :func:`fastdd_command`."""

    argv: Callable[[Path], list[str]]
    rerun: Callable[[Path], list[str]] | None = None  # default: argv
    prepare: Callable[[Path], None] | None = None


def _distill_rerun(work: Path) -> list[str]:
    """The user's next step after a cut distill: --resume once config.json exists, else the same command."""
    resume = ["--resume"] if (work / "case" / "run" / "config.json").is_file() else []
    return [*DISTILL, "--out", str(work / "case" / "run"), *resume]


SCENARIOS = {
    "distill": Scenario(argv=lambda work: [*DISTILL, "--out", str(work / "case" / "run")], rerun=_distill_rerun),
    "experts": Scenario(argv=lambda work: [*EXPERTS, "--out", str(work / "case" / "experts")]),
    "difficulty": Scenario(
        argv=lambda work: ["difficulty", "--dataset", "digits", "--experts", str(work / "inputs" / "experts"),
                           "--networks", "1", "--out", str(work / "case" / "difficulty"), "--device", "cpu",
                           "--quiet"],
        prepare=lambda work: fastdd_command([*EXPERTS, "--out", str(work / "inputs" / "experts")])),
    "evaluate": Scenario(
        argv=lambda work: ["evaluate", str(work / "case" / "run"), "--models", "1", "--eval-epochs", "1",
                           "--eval-model", "ConvNetW32", "--no-baseline", "--device", "cpu", "--quiet"],
        prepare=lambda work: fastdd_command([*DISTILL, "--eval-models", "0", "--out", str(work / "initial" / "run")])),
}


# ----------------------------------------------------------------------------- one run of a command
def _hook(case: Path, mode: str, cut: int, passed: list[tuple[str, str]]) -> None:
    """Replace ``fastdd.io.write_point`` by one that appends every point to ``passed`` and does what ``mode`` says:
    "kill": at every point, a forked copy of the process is killed there (``os._exit(137)``) and, once it is dead,
    the case folder is copied to CASE/../kills/K (K: the point's number); "enospc": at point ``cut``, raise a
    full disk; "pause": at point ``cut``, print "paused" and wait for a line on stdin."""
    import fastdd.io

    def write_point(path: Path, stage: str) -> None:
        path = Path(path)
        where = str(path.relative_to(case)) if path.is_relative_to(case) else str(path)
        passed.append((_normal_name(where), stage))
        k = len(passed) - 1
        if mode == "kill":
            _kill_copy(case, k)
        elif k == cut and mode == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        elif k == cut and mode == "pause":
            print("paused", flush=True)
            sys.stdin.readline()

    fastdd.io.write_point = write_point


def _kill_copy(case: Path, k: int) -> None:
    """Kill a forked copy of this process here, then copy ``case`` (what the kill left) to CASE/../kills/K."""
    pid = os.fork()
    if pid == 0:
        os._exit(KILLED)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != KILLED:
        raise RuntimeError(f"the copy killed at point {k} did not exit {KILLED}")
    shutil.copytree(case, case.parent / "kills" / str(k), symlinks=True)


def _points_file(case: Path) -> Path:
    return case.parent / "points.json"


def run(argv: list[str], case: Path, mode: str = "count", cut: int = -1) -> tuple[int, str, list[tuple[str, str]]]:
    """Run ``fastdd argv`` in a forked process with its write points hooked (:func:`_hook`; "count": only
    counted); returns its exit status, its stderr and the points it passed."""
    err = case.parent / "stderr.txt"
    _points_file(case).unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 70
        passed: list[tuple[str, str]] = []
        try:
            os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            from fastdd.cli import main

            _hook(case, mode, cut, passed)
            status = main(argv)
        except BaseException:  # noqa: BLE001 - a traceback is a failure the parent reports
            traceback.print_exc()
        finally:
            _points_file(case).write_text(json.dumps(passed))
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    points = [tuple(p) for p in json.loads(_points_file(case).read_text())] if _points_file(case).exists() else []
    return status, err.read_text(), points


# ----------------------------------------------------------------------------- the state of a folder
def _normal_name(name: str) -> str:
    """``name`` with the random part of a temporary file's name replaced by XXXXXXXX."""
    from fastdd.io import TEMP_SUFFIX, temporary_of

    parts = name.split("/")
    target = temporary_of(parts[-1])
    if target is not None:
        parts[-1] = f".{target}.XXXXXXXX{TEMP_SUFFIX}"
    return "/".join(parts)


def _without_seconds(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    return value


def _normal_bytes(name: str, data: bytes) -> bytes:
    """The bytes of file ``name`` as compared: JSON and JSON lines without wall times."""
    if name.endswith((".json", ".jsonl")):
        lines = []
        for line in data.split(b"\n"):
            try:
                lines.append(json.dumps(_without_seconds(json.loads(line)), sort_keys=True).encode())
            except ValueError:
                lines.append(line)  # torn by a kill, or not JSON
        return b"\n".join(lines) if name.endswith(".jsonl") else _whole_json(data)
    return data


def _whole_json(data: bytes) -> bytes:
    try:
        return json.dumps(_without_seconds(json.loads(data)), sort_keys=True).encode()
    except ValueError:
        return data


def state(case: Path) -> dict[str, bytes]:
    """The files under ``case`` (links as their target's name), normalised for comparison."""
    from fastdd.runtime.lock import LOCK_FILE

    files = {}
    for path in sorted(case.rglob("*")):
        name = _normal_name(str(path.relative_to(case)))
        if path.name == LOCK_FILE:
            continue  # left by a kill, taken over by the next command that writes there
        if path.is_symlink():
            files[name] = b"link to " + os.readlink(path).encode()
        elif path.is_file():
            files[name] = _normal_bytes(path.name, path.read_bytes())
    return files


def _digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name, data in sorted(files.items()):
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def _differences(files: dict[str, bytes], reference: dict[str, bytes]) -> str:
    missing = sorted(reference.keys() - files.keys())
    extra = sorted(files.keys() - reference.keys())
    differing = sorted(k for k in files.keys() & reference.keys() if files[k] != reference[k])
    return "; ".join(f"{what}: {', '.join(names)}" for what, names in
                     (("missing", missing), ("extra", extra), ("differing", differing)) if names)


# ----------------------------------------------------------------------------- the harness
def _one_line(err: str) -> str | None:
    """The error line of a command that failed cleanly (exactly one error line on stderr, beside the evaluation's
    warnings: the scenarios' one-epoch networks do not learn), else None."""
    lines = [line for line in err.splitlines() if line.strip() and ": warning: " not in line]
    return lines[0] if len(lines) == 1 and lines[0].startswith("fastdd ") and ": error: " in lines[0] else None


def _fresh_case(work: Path, source: Path) -> Path:
    """WORK/case, a copy of ``source``."""
    case = work / "case"
    if case.exists():
        shutil.rmtree(case)
    shutil.copytree(source, case, symlinks=True)
    return case


def harness(name: str, work: Path) -> dict[str, Any]:
    """Run scenario ``name`` in the empty folder ``work``: the counts and every failure found."""
    scenario = SCENARIOS[name]
    (work / "initial").mkdir(parents=True)
    if scenario.prepare is not None:
        scenario.prepare(work)
    argv, rerun = scenario.argv(work), scenario.rerun or scenario.argv
    _fresh_case(work, work / "initial")
    fastdd_command(argv)  # what the first run imports and builds is then there for every fork
    case = _fresh_case(work, work / "initial")
    status, err, points = run(argv, case, "kill")  # the uninterrupted run, killed in copies at every point
    if status != 0:
        return {"scenario": name, "failures": [f"the uninterrupted run failed ({status}): {err[-2000:]}"]}
    reference = state(case)
    initial, marked = state(work / "initial"), {where for where, _ in points}
    failures = [f"{where} was written without passing a write point (not through fastdd.io)"
                for where, data in reference.items() if initial.get(where) != data and where not in marked]
    reruns: dict[str, str] = {}  # state digest -> "" or the failure its rerun gave
    cuts = [("kill", k) for k in range(len(points))]
    cuts += [("enospc", k) for k, point in enumerate(points) if point[1] in ENOSPC_STAGES]
    for mode, k in cuts:
        where = f"{mode} at point {k} {points[k]}"
        if mode == "kill":
            case = _fresh_case(work, work / "kills" / str(k))
        else:
            case = _fresh_case(work, work / "initial")
            problem = _full_disk(argv, case, k, points[k])
            if problem:
                failures.append(f"{where}: {problem}")
                continue
        key = _digest(state(case))
        if key not in reruns:
            reruns[key] = _rerun(rerun(work), case, reference)
        if reruns[key]:
            failures.append(f"{where}: {reruns[key]}")
    return {"scenario": name, "points": len(points), "cuts": len(cuts), "reruns": len(reruns), "failures": failures}


def _full_disk(argv: list[str], case: Path, k: int, point: tuple[str, str]) -> str:
    """Run ``argv`` with a full disk at point ``k``; what went wrong ("" when it failed as it should)."""
    status, err, passed = run(argv, case, "enospc", k)
    if len(passed) <= k or passed[k] != point:
        return f"the run passed other points ({passed[k:k + 1]}): the command is not deterministic"
    line = _one_line(err)
    if status != 1 or line is None:
        return f"exit status {status} and not one error line: {err[-2000:]}"
    return "" if Path(point[0]).name in line else f"the error line does not name {Path(point[0]).name}: {line}"


def _rerun(argv: list[str], case: Path, reference: dict[str, bytes]) -> str:
    """Run ``argv`` again after a cut; what differs from the reference ("" when nothing)."""
    status, err, _ = run(argv, case)
    if status != 0 and not (status == 1 and ": error: " in err and "--overwrite" in err.splitlines()[-1]):
        return f"the rerun exited {status}: {err[-2000:]}"
    differences = _differences(state(case), reference)
    return f"the rerun's files differ from the uninterrupted run's ({differences})" if differences else ""


def _plan_once() -> None:
    """Make ``fastdd distill``'s memory plan once per distiller setting in this process, for every fork: it writes
    nothing, and tracing the networks takes most of a tiny run's time."""
    import fastdd.api

    plans: dict[str, Any] = {}
    plan_memory = fastdd.api.plan_memory

    def plan_once(distiller: Any) -> Any:
        key = repr((distiller.name, tuple(distiller.images.shape), sorted(distiller.hparams().items())))
        if key not in plans:
            plans[key] = plan_memory(distiller)
        return plans[key]

    fastdd.api.plan_memory = plan_once


def fastdd_command(argv: list[str]) -> None:
    """Run ``fastdd argv`` in this process, quietly (what it imports and builds then serves every fork); a
    RuntimeError when it fails."""
    from fastdd.cli import main

    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        status = main(argv)
    if status != 0:
        raise RuntimeError(f"fastdd {' '.join(argv)} exited {status}")


def _in_workers(names: list[str], work: Path) -> list[dict[str, Any]]:
    """:func:`harness` for each scenario of ``names``, :data:`WORKERS` forked processes at a time."""
    pending, running = list(names), {}
    while pending or running:
        while pending and len(running) < WORKERS:
            name = pending.pop(0)
            pid = os.fork()
            if pid == 0:
                began = time.perf_counter()
                try:
                    result = harness(name, work / name)
                except BaseException:  # noqa: BLE001 - reported as the scenario's failure
                    result = {"scenario": name, "failures": [traceback.format_exc()]}
                result["seconds"] = round(time.perf_counter() - began, 1)
                (work / f"{name}.json").write_text(json.dumps(result))
                os._exit(0)
            running[pid] = name
        pid, _ = os.wait()
        running.pop(pid)
    return [json.loads((work / f"{name}.json").read_text()) if (work / f"{name}.json").exists() else
            {"scenario": name, "failures": ["its process died"]} for name in names]


def main(argv: list[str]) -> int:
    if argv[:1] == ["harness"]:
        work = Path(argv[1])
        os.environ["FASTDD_CACHE"] = str(work / "fastdd-cache")  # UDD's proxies, never the user's cache
        os.environ["OMP_NUM_THREADS"] = "1"  # before torch starts: a forked process inherits no thread pool
        _plan_once()  # imports fastdd, once for every fork
        for result in _in_workers(argv[2:], work):
            print(json.dumps(result), flush=True)
        return 0
    if argv[:1] == ["pause"]:
        from fastdd.cli import main as fastdd

        _hook(Path("/"), "pause", int(argv[1]), [])
        return fastdd(argv[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
