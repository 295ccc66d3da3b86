"""Train and evaluate a list of recipes inside one time-limited command on a lent GPU, and resume in the next.

A lent GPU runs one command of at most 10 minutes, on a machine that may be fresh at the next call: only the files
written under $OUT come back, and only the paths carried in go over. This script runs recipes back to back (up to
--parallel at once on one GPU, under MPS where it is available), keeps everything a run needs to go on in one
state folder, stops before --deadline, and packs that folder into $OUT/gpu-session.tgz. Carried back into the next
call, the same command resumes every unfinished run from its last checkpoint, evaluates runs whose training ended
but whose evaluation did not, and skips runs whose result rows are there.

    python benchmarks/gpu_session.py --state .gpu-session --deadline 540 --device cuda --parallel 3 \\
        protonet-omniglot-1shot:420 protonet-omniglot-5shot:420 maml-omniglot-5way-1shot:1200 ...
    python benchmarks/gpu_session.py --state .gpu-session --collect   # here: rows into benchmarks/results/

RECIPE:SECONDS is the run's whole training-time budget (train.time_budget_s), summed over all the calls that train
it; without one, --budget, or else the recipe's own (none: its full step count). RECIPE:SECONDS:STEPS also caps
train.steps (for a schedule that should end inside the budget, such as Reptile's linear anneal).

How a call ends in time. The stop is at deadline - pack_reserve - grace. Each worker trains its run until `margin`
seconds before the stop: the trainer's time budget is set, for this call only, to what the run has trained so far
plus the time left, so the trainer ends as at any budget (it validates and checkpoints); the run counts as
finished when it reaches its step count or its real budget, and only then is evaluated. As a backstop, workers
still going at the stop get SIGTERM (a SystemExit in the worker, so the run folder's lock and an overwritten run
are handled as for any error; the trainer itself saves nothing on a signal) and SIGKILL `grace` seconds later;
the trainer's `checkpoint_every_s`, set to --checkpoint-every (60 s), bounds what such a cut loses. Training time
is the trainer's own count, restored from the checkpoint on resume, so a row's train_seconds is the sum over the
calls (each call's final validation is not counted, as at any budget stop).

State folder (`--state`): runs/<stem>/ (the trainer's run folder: checkpoints last and best, metrics.jsonl,
results.json), status/<stem>.json (what the run reached: steps, train seconds, calls, trained, error),
results/<stem>.json (its result rows, also written to benchmarks/results/), logs/<stem>.log (each call's worker
output), session.json (one entry per call). <stem> is the recipe name and the tag (e.g.
protonet-omniglot-1shot-gpu). The pack leaves out locks, half-written checkpoints and the `last` checkpoint of
finished runs (their `best`, the evaluated weights, stays). To train a finished run again, delete its
results/<stem>.json, status/<stem>.json and runs/<stem>/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):  # kshot from this checkout (the device machine does not install it)
    if _path not in sys.path:
        sys.path.insert(0, _path)

PACK = "gpu-session.tgz"
FILE_LIMIT = 16 * 2**20  # what one file coming back from $OUT may hold
FILES_LIMIT = 8  # files coming back from $OUT
CARRY_LIMIT = 64 * 2**20  # the working tree with its carried paths, sent to the device machine
CARRY_WARNING = 40 * 2**20  # above this the state leaves too little of CARRY_LIMIT for the data and the wheels
SKIPPED_NAMES = {".lock", "__pycache__"}


class StopSession(SystemExit):
    """Raised in a worker by SIGTERM, so that `finally` blocks (the run folder's lock) run before it exits."""


@dataclass(frozen=True)
class Spec:
    """One RECIPE[:SECONDS[:STEPS]] argument: a recipe name or YAML path, its whole training budget (None: the
    recipe's own) and a cap on its steps (None: the recipe's), e.g. reptile-omniglot-5way-1shot:900:20000 so that
    Reptile's linear learning-rate anneal ends inside the budget (SECONDS may be left empty: RECIPE::STEPS)."""

    text: str
    recipe: str
    budget: float | None
    steps: int | None = None

    @classmethod
    def parse(cls, text: str, default_budget: float | None = None) -> Spec:
        fields = text.split(":")
        for count in (2, 1):  # trailing numeric fields, the budget first
            tail = fields[-count:]
            if len(fields) > count and all(f == "" or _is_number(f) for f in tail) and any(tail):
                budget = float(tail[0]) if tail[0] else default_budget
                steps = tail[1] if count == 2 else ""
                if budget is not None and (not math.isfinite(budget) or budget <= 0):
                    raise SystemExit(f"{text}: the budget after ':' must be a positive number of seconds")
                if steps and (not steps.isdigit() or int(steps) < 1):
                    raise SystemExit(f"{text}: the steps after the budget must be a positive whole number")
                return cls(text, ":".join(fields[:-count]), budget, int(steps) if steps else None)
        return cls(text, text, default_budget)

    @property
    def canonical(self) -> str:
        """RECIPE:SECONDS[:STEPS] with the budget that applies (a --budget default written out), for result rows."""
        budget = f"{self.budget:g}" if self.budget is not None else ""
        return self.recipe + (f":{budget}" if budget or self.steps else "") + \
            (f":{self.steps}" if self.steps else "")

    def overrides(self, sets: list[str], checkpoint_every: float) -> list[str]:
        """The recipe overrides of every call of this run (the same each call, so that resuming is allowed)."""
        extra = [f"train.checkpoint_every_s={checkpoint_every!r}"]
        if self.budget is not None:
            extra.append(f"train.time_budget_s={self.budget!r}")
        if self.steps is not None:
            extra.append(f"train.steps={self.steps}")
        return list(sets) + extra


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class StatePaths:
    """Where one run's files live in the state folder."""

    def __init__(self, state: Path, stem: str) -> None:
        self.state, self.stem = Path(state), stem
        self.run = self.state / "runs" / stem
        self.status = self.state / "status" / f"{stem}.json"
        self.results = self.state / "results" / f"{stem}.json"
        self.log = self.state / "logs" / f"{stem}.log"


def stem_of(recipe_name: str, tag: str) -> str:
    return recipe_name + (f"-{tag}" if tag else "")


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def write_json(path: Path, data: Any) -> None:
    """Write atomically (a stopped process never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)


def last_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The info of a run folder's `last` checkpoint ({} if it has none): step and train_seconds."""
    from kshot.training.checkpoint import CheckpointError, read_info

    try:
        return read_info(Path(run_dir) / "checkpoints" / "last")
    except (CheckpointError, OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------------ the worker
def run_worker(spec: Spec, state: Path, device: str = "cpu", tag: str = "gpu", sets: list[str] | None = None,
               stop_at: float = math.inf, margin: float = 30.0, checkpoint_every: float = 60.0,
               command: str = "", shared: str = "", results: Path | None = None) -> dict[str, Any]:
    """Train (or resume) one run until it is finished or `margin` seconds before `stop_at` (epoch seconds),
    then, if finished, evaluate it and write its rows (state folder and `results`, by default
    benchmarks/results/). Returns its status, also saved in status/<stem>.json."""
    from kshot.pipeline import evaluate_recipe, prepare_recipe_data, result_rows, train_recipe, write_results
    from kshot.recipe import load_recipe
    from kshot.training.checkpoint import load_learner

    recipe = load_recipe(spec.recipe, spec.overrides(sets or [], checkpoint_every))
    paths = StatePaths(state, stem_of(recipe.name, tag))
    status = read_json(paths.status, {}) or {}
    status.update(stem=paths.stem, spec=spec.text, budget=recipe.train.time_budget_s, steps_target=recipe.train.steps,
                  calls=status.get("calls", 0) + 1, state="starting", error=None, note=None)
    write_json(paths.status, status)
    try:
        warm_up(device)
        recipe, data = prepare_recipe_data(recipe)
        trained = status.get("trained")
        if trained is None:
            done = float(last_checkpoint(paths.run).get("train_seconds") or 0.0)
            slice_s = stop_at - margin - time.time()
            total = recipe.train.time_budget_s
            cut = total is None or done + slice_s < total  # this call ends before the run's real budget
            if cut and slice_s <= 0:
                status.update(state="paused", note="no time left in this call")
                return status
            call_recipe = replace(recipe, train=replace(recipe.train, time_budget_s=done + slice_s)) if cut \
                else recipe
            status.update(state="training", training_calls=status.get("training_calls", 0) + 1)
            write_json(paths.status, status)
            run = train_recipe(call_recipe, paths.run, device=device, resume=paths.run.is_dir(), progress=False,
                               data=data)
            status.update(steps=run.steps, train_seconds=run.train_seconds)
            if cut and run.steps < recipe.train.steps:
                status.update(state="paused")
                return status
            trained = {"steps": run.steps, "train_seconds": run.train_seconds}
            status.update(trained=trained, state="evaluating")
            write_json(paths.status, status)
            learner = run.learner
        else:  # trained in an earlier call that was stopped during evaluation
            status.update(state="evaluating")
            write_json(paths.status, status)
            learner, _ = load_learner(paths.run / "checkpoints" / "best", map_location=device)
        evaluations = evaluate_recipe(learner, recipe, device=device, progress=False)
        rows = result_rows(recipe, evaluations, trained["train_seconds"], trained["steps"], device)
        calls = status.get("training_calls", 0)
        calls = f" (trained over {calls} calls)" if calls > 1 else ""
        for row in rows:
            row["command"] = (command or f"python benchmarks/gpu_session.py --device {device} {spec.canonical}") \
                + calls
            if shared:
                row["device"] = f"{row['device']} ({shared})"
        write_results(paths.run, rows)
        publish(paths, rows, results)
        for evaluation in evaluations:
            print(evaluation.summary(), flush=True)
        status.update(state="done", rows=[{k: r[k] for k in ("ways", "shots", "accuracy", "ci95", "ece")}
                                          for r in rows])
        return status
    except StopSession:
        status.update(state="stopped", note="stopped at the deadline; the next call resumes from the last checkpoint")
        raise
    except BaseException as error:
        status.update(state="failed", error=f"{type(error).__name__}: {error}".splitlines()[0][:500])
        raise
    finally:
        if status.get("state") not in ("done", "failed", "stopped"):
            info = last_checkpoint(paths.run)
            if info and not status.get("trained"):
                status.update(steps=info.get("step"), train_seconds=info.get("train_seconds"))
        write_json(paths.status, status)


def warm_up(device: str) -> None:
    """Pay the one-time costs that come between the worker's deadline arithmetic and the trainer's first step
    before that arithmetic, so that the call's training slice is spent training: the CUDA context, and
    torch._dynamo, which the first optimiser imports (seconds on a loaded CPU)."""
    import torch
    import torch._dynamo  # noqa: F401

    if device.startswith("cuda"):
        torch.zeros(1, device=device)


def publish(paths: StatePaths, rows: list[dict[str, Any]], results: Path | None = None) -> None:
    """A finished run's rows into the state folder and `results` (benchmarks/results/), its training log into
    results/logs/ (where BENCHMARKS.md's learning curves are read from)."""
    import report

    results = Path(results) if results is not None else report.RESULTS
    write_json(paths.results, rows)
    write_json(results / f"{paths.stem}.json", rows)
    metrics = paths.run / "metrics.jsonl"
    if metrics.is_file():
        (results / "logs").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(metrics, results / "logs" / f"{paths.stem}.metrics.jsonl")


# ------------------------------------------------------------------------------------------------ the session
@dataclass
class Job:
    spec: Spec
    paths: StatePaths
    dataset: dict[str, Any]
    splits: list[str]
    process: subprocess.Popen | None = None


def plan(specs: list[Spec], state: Path, tag: str, sets: list[str], checkpoint_every: float) -> list[Job]:
    """Check every recipe before anything runs (a typo fails at once, not after the first runs) and name its run."""
    from kshot.recipe import load_recipe

    jobs, seen = [], {}
    for spec in specs:
        recipe = load_recipe(spec.recipe, spec.overrides(sets, checkpoint_every))
        stem = stem_of(recipe.name, tag)
        if stem in seen:
            raise SystemExit(f"{spec.text} and {seen[stem]} are the same run ({stem}); list each recipe once")
        seen[stem] = spec.text
        splits = sorted({s for s in recipe.splits.values() if s})
        jobs.append(Job(spec, StatePaths(state, stem), dict(recipe.dataset), splits))
    return jobs


def prepare_datasets(jobs: list[Job]) -> None:
    """Build each shipped dataset's cache once, here, rather than in several workers at once."""
    from kshot.data.registry import load_dataset

    done: set[str] = set()
    for job in jobs:
        key = json.dumps(job.dataset, sort_keys=True, default=str)
        if job.dataset.get("name") == "folder" or key in done:
            continue
        done.add(key)
        for split in job.splits:
            load_dataset(job.dataset, split)


def start_mps() -> bool:
    """Start NVIDIA's Multi-Process Service (kernels of several processes run at once on the GPU); True if
    this session started it (and so stops it)."""
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        return False
    started = subprocess.run([control, "-d"], capture_output=True).returncode == 0
    if started:
        print("MPS daemon started (kernels of the runs' processes share the GPU)", flush=True)
    return started


def stop_mps() -> None:
    control = shutil.which("nvidia-cuda-mps-control")
    if control is not None:
        subprocess.run([control], input=b"quit\n", capture_output=True)


def launch(job: Job, args: argparse.Namespace, stop_at: float, shared: str) -> subprocess.Popen:
    """Start one worker process for `job`, its output appended to logs/<stem>.log."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--state", str(args.state),
               "--device", args.device, "--tag", args.tag, "--stop-at", repr(stop_at), "--margin", str(args.margin),
               "--checkpoint-every", str(args.checkpoint_every), "--shared", shared]
    if args.results is not None:
        command += ["--results", str(args.results)]
    for value in args.sets:
        command += ["--set", value]
    command.append(job.spec.canonical)  # the --budget default written out
    job.paths.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.paths.log, "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} call: {' '.join(command[1:])}\n")
        log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def stop_workers(jobs: list[Job], grace: float) -> None:
    """SIGTERM every worker still going, SIGKILL those still going `grace` seconds later."""
    live = [job.process for job in jobs if job.process is not None and job.process.poll() is None]
    for process in live:
        process.send_signal(signal.SIGTERM)
    end = time.time() + grace
    for process in live:
        try:
            process.wait(timeout=max(0.0, end - time.time()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_session(args: argparse.Namespace) -> int:
    """Run every unfinished job inside the deadline, pack the state, print one line per run."""
    started = time.time()
    state = Path(args.state)
    stop_at = started + args.deadline - args.pack_reserve - args.grace  # SIGTERM then; SIGKILL `grace` later
    if stop_at - started < args.margin + args.min_slice:
        raise SystemExit(f"--deadline {args.deadline:g} leaves no training time after --pack-reserve, --grace, "
                         f"--margin and --min-slice ({args.pack_reserve:g}, {args.grace:g}, {args.margin:g}, "
                         f"{args.min_slice:g} s)")
    specs = [Spec.parse(text, args.budget) for text in args.recipes]
    jobs = plan(specs, state, args.tag, args.sets, args.checkpoint_every)
    pending = [job for job in jobs if not job.paths.results.is_file()]
    history = read_json(state / "session.json", []) or []
    call = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "device": args.device, "deadline": args.deadline,
            "parallel": args.parallel, "pending": [job.paths.stem for job in pending]}
    shared = ""
    if args.device.startswith("cuda") and args.parallel > 1 and len(pending) > 1:
        shared = f"up to {min(args.parallel, len(pending))} runs at once on it"
    mps = False
    previous = signal.signal(signal.SIGTERM, _stop)  # a stopped session still stops its workers and packs
    try:
        if pending:
            prepare_datasets(pending)
            mps = bool(shared) and start_mps()
            if mps:
                shared += " under MPS"
        queue = list(pending)
        while queue or any(job.process is not None and job.process.poll() is None for job in pending):
            now = time.time()
            if now >= stop_at:
                break
            running = sum(1 for job in pending if job.process is not None and job.process.poll() is None)
            while queue and running < args.parallel and stop_at - now >= args.margin + args.min_slice:
                job = queue.pop(0)
                job.process = launch(job, args, stop_at, shared)
                running += 1
            if queue and running == 0:  # too little time left to start another run
                break
            time.sleep(0.2)
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_workers(pending, args.grace)
        if mps:
            stop_mps()
        call["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        call["seconds"] = round(time.time() - started, 1)
        write_json(state / "session.json", history + [call])
        lines = [progress_line(job.paths) for job in jobs]
        if args.out:
            pack(state, Path(args.out))
        print("\n".join(lines), flush=True)
    finished = sum(1 for job in jobs if job.paths.results.is_file())
    print(f"{finished} of {len(jobs)} runs finished; "
          + ("all done" if finished == len(jobs) else "run the same command again (state carried) to go on"))
    return 0


def progress_line(paths: StatePaths) -> str:
    """One line for a run: steps, training seconds, state, and accuracy +- CI for each evaluated setting."""
    status = read_json(paths.status, {}) or {}
    rows = read_json(paths.results, None)
    info = last_checkpoint(paths.run) if rows is None else {}
    steps = rows[0].get("train_steps") if rows else info.get("step", status.get("steps"))
    seconds = rows[0].get("train_seconds") if rows else info.get("train_seconds", status.get("train_seconds"))
    state = "done" if rows else status.get("state", "not started")
    if state == "training" or state == "starting":  # the worker was killed before it could say more
        state = "cut off"
    line = (f"{paths.stem:<44} {state:<10} steps {steps if steps is not None else '-':>7}  "
            f"train {float(seconds or 0):7.1f} s  calls {status.get('calls', 0)}")
    if rows:
        line += "  " + ", ".join(f"{r['ways']}-way {r['shots']}-shot {r['accuracy']:.2f} +- "
                                 f"{(r.get('ci95') or 0):.2f}" for r in rows)
    if status.get("error"):
        line += f"  error: {status['error']}"
    return line


# ------------------------------------------------------------------------------------------------ packing
def _packed(state: Path) -> list[Path]:
    """The files of the state folder needed to go on: all but locks, partial checkpoint folders, temporary files,
    and the `last` checkpoint (optimiser state, for resuming) of runs that have their rows; their `best`, the
    evaluated weights, stays."""
    files = []
    for path in sorted(state.rglob("*")):
        parts = path.relative_to(state).parts
        if any(p in SKIPPED_NAMES or p.endswith(".partial") or p.endswith(".tmp") for p in parts):
            continue
        if parts[:1] == ("runs",) and len(parts) > 3 and parts[2:4] == ("checkpoints", "last") and \
                (state / "results" / f"{parts[1]}.json").is_file():
            continue
        if path.is_file() and not path.is_symlink():
            files.append(path)
    return files


def pack(state: Path, out: Path) -> list[Path]:
    """Pack the state folder into out/gpu-session.tgz (members under the state folder's own name, so that
    `tar xzf` in the folder holding it puts it back), split into 16 MiB parts if larger; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(PACK + "*"):
        old.unlink()
    files = _packed(state)
    raw = sum(f.stat().st_size for f in files)
    target = out / PACK
    with tarfile.open(target, "w:gz") as tar:
        for path in files:
            tar.add(path, arcname=str(Path(state.name) / path.relative_to(state)), recursive=False)
    size = target.stat().st_size
    parts = [target]
    if size > FILE_LIMIT:
        parts = []
        with open(target, "rb") as whole:
            while chunk := whole.read(FILE_LIMIT):
                part = out / f"{PACK}.part-{len(parts):02d}"
                part.write_bytes(chunk)
                parts.append(part)
        target.unlink()
    mib = 2**20
    print(f"packed {len(files)} files ({raw / mib:.1f} MiB) into {', '.join(p.name for p in parts)} "
          f"({size / mib:.1f} MiB)", flush=True)
    if len(parts) > FILES_LIMIT - 1 or size > CARRY_LIMIT:
        print(f"WARNING: the packed state ({size / mib:.1f} MiB) is more than a call can return (8 files of 16 MiB, "
              f"64 MiB in all) or carry back (64 MiB with the working tree): fewer runs per state folder",
              flush=True)
    elif raw > CARRY_WARNING:
        print(f"WARNING: the state folder ({raw / mib:.1f} MiB) and the carried dataset and wheels may not fit "
              f"the 64 MiB a call carries; use another --state for some of the runs", flush=True)
    return parts


# ------------------------------------------------------------------------------------------------ collecting
def collect(state: Path, results: Path | None = None) -> int:
    """Copy the finished runs' rows and training logs from the state folder into benchmarks/results/ and
    regenerate BENCHMARKS.md (run here, after unpacking the state a call returned); into `results` instead, if
    given, without touching BENCHMARKS.md."""
    import report

    stems = sorted(p.stem for p in (Path(state) / "results").glob("*.json"))
    for stem in stems:
        paths = StatePaths(state, stem)
        publish(paths, read_json(paths.results), results)
    for status_path in sorted((Path(state) / "status").glob("*.json")):
        print(progress_line(StatePaths(state, status_path.stem)))
    where = results if results is not None else report.RESULTS
    print(f"copied the rows of {len(stems)} finished runs into {where}"
          + ("" if results is not None else f"; wrote {report.write_report()}"))
    return 0


# ------------------------------------------------------------------------------------------------ command line
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipes", nargs="*",
                   help="RECIPE[:SECONDS[:STEPS]]: a recipe name or YAML file, its training budget, a cap on its steps")
    p.add_argument("--state", type=Path, default=Path(".gpu-session"), help="the state folder (default .gpu-session)")
    p.add_argument("--deadline", type=float, default=540.0,
                   help="seconds from the start by which the state is packed (default 540)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--parallel", type=int, default=3, help="runs at once (default 3)")
    p.add_argument("--budget", type=float, default=None,
                   help="training seconds of a recipe given without :SECONDS (default: the recipe's own)")
    p.add_argument("--tag", default="gpu", help="suffix of the run and results names (default gpu)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="recipe override KEY=VALUE, every run")
    p.add_argument("--margin", type=float, default=30.0,
                   help="seconds kept after each call's training for its validation and checkpoint (default 30)")
    p.add_argument("--pack-reserve", type=float, default=10.0,
                   help="seconds kept after the workers are gone for packing the state (default 10)")
    p.add_argument("--min-slice", type=float, default=10.0,
                   help="no run starts with fewer seconds than this left before its stop (default 10)")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds between SIGTERM to the workers still going and SIGKILL (default 10)")
    p.add_argument("--checkpoint-every", type=float, default=60.0,
                   help="train.checkpoint_every_s of every run: what a killed worker can lose at most (default 60)")
    p.add_argument("--results", type=Path, default=None,
                   help="where finished runs' rows go besides the state folder (default benchmarks/results/)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="where gpu-session.tgz goes (default $OUT)")
    p.add_argument("--collect", action="store_true",
                   help="run nothing: copy the state's finished rows into benchmarks/results/ and regenerate "
                        "BENCHMARKS.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stop-at", type=float, default=math.inf, help=argparse.SUPPRESS)
    p.add_argument("--shared", default="", help=argparse.SUPPRESS)
    return p


def _stop(signum: int, frame: Any) -> None:
    raise StopSession(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.collect:
        return collect(args.state, args.results)
    if args.parallel < 1:
        raise SystemExit("--parallel must be at least 1")
    if not args.recipes:
        raise SystemExit("name at least one recipe (RECIPE[:SECONDS[:STEPS]]), or pass --collect")
    if args.worker:
        from kshot.allocator import tune_malloc

        tune_malloc()  # as the kshot command does
        signal.signal(signal.SIGTERM, _stop)
        spec = Spec.parse(args.recipes[0], args.budget)
        command = (f"python benchmarks/gpu_session.py --device {args.device} --tag {args.tag} "
                   + "".join(f"--set {s} " for s in args.sets) + spec.canonical)
        status = run_worker(spec, args.state, args.device, args.tag, args.sets, args.stop_at, args.margin,
                            args.checkpoint_every, command, args.shared, args.results)
        print(f"{status['stem']}: {status['state']}", flush=True)
        return 0
    return run_session(args)


if __name__ == "__main__":
    sys.exit(main())
