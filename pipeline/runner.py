"""Run the pipeline's jobs as stage scripts, in dependency order, up to --jobs of them side by side.

A job is one stage script run into its own folder. It is reused when its folder holds the
finished run of the same command: results.json carrying the fingerprint of this command (the stage
writes it when it finishes; utils.fingerprint), the model file it names, and runner.json, which the
runner writes once the stage has succeeded, holding the same command but for the paths of its input
files (a moved folder whose inputs have the same content is reused). It is resumed when its
checkpoint.pth carries this command's fingerprint, and run again from scratch (--overwrite)
otherwise. An upstream stage run again writes a new model file, so every job downstream of it
changes too.

Each stage runs with a fixed number of threads (--threads), whatever --jobs is, so a seed's
numbers do not depend on how many stages share the machine. With more than one job at a time the
stages' output goes to <results_dir>/logs/<job>.log and the runner prints one line per start and end.
"""
import ctypes
import difflib
import importlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import UserError
from utils.fingerprint import PATH_FLAGS, differences, file_hash, same_run, stage_fingerprint
from utils.files import load_checkpoint, save_json
from utils.lock import RunLock
from utils.records import RESULTS, Results

ROOT = Path(__file__).resolve().parent.parent
RECORD = "runner.json"          # in each stage folder: the command of the run that finished there
TIMES = "stage_times.json"      # in the results folder: seconds per job, by job key
POLL_SECONDS = 0.2


@dataclass
class Job:
    """One stage run. `args(done)` gives the script's flags once every job in `deps` has finished;
    `done` maps a job key to that job's Results (encoder as a full path). `training`: the stage may
    run under torchrun with several processes. `inputs`: files the stage reads that its command does
    not name (e.g. a poisoned dataset), hashed into its record like the files it names."""
    key: str
    name: str
    script: str
    folder: Path
    args: object
    deps: tuple = ()
    training: bool = False
    inputs: tuple = ()


@dataclass
class Runner:
    """Runs jobs into results_dir: `common` flags go to every stage, `threads` sets each stage's
    thread count, `nproc` the processes of a training stage (torchrun when above 1)."""
    results_dir: Path
    common: list
    threads: int = 1
    nproc: int = 1
    times: dict = field(default_factory=dict)

    def __post_init__(self):
        self.results_dir = Path(self.results_dir)
        times = self.results_dir / TIMES
        self.times = json.loads(times.read_text()) if times.exists() else {}

    # ------------------------------------------------------------ one job

    def record(self, job, done):
        """What decides the stage's result: its command (without --results_dir and restart flags)
        and the stage's fingerprint for that command (utils.fingerprint, computed by the stage
        script's own parser and input_files, as the stage itself computes it: its result-changing
        flags and the sha256 of every file it reads), plus the hash of the job's extra inputs. A
        script that is no stage module of this repository (tests) has no fingerprint."""
        command = [job.script, *map(str, job.args(done)), *self.common]
        record = {"command": command, "inputs": {str(p): file_hash(ROOT / p) for p in job.inputs}}
        found = fingerprint_of(command)
        return record if found is None else {**record, "fingerprint": found}

    def reusable(self, job, record):
        """The job's Results when its folder holds the finished run of this record, else None.
        runner.json alone proves nothing about results.json (a run killed or failed before the stage
        cleared its folder leaves the old results.json), so the fingerprint the stage wrote into
        results.json must be this record's; runner.json must hold the same command but for the
        paths of its input files, whose content the fingerprint covers."""
        if "fingerprint" not in record or not same_command(recorded(job.folder), record):
            return None
        found = stored_results(job.folder)
        if found is None or not same_run(found.fingerprint, record["fingerprint"]):
            return None
        return found if found.encoder == "" or Path(found.encoder).exists() else None

    def launch(self, job, record, log):
        """Start the stage; returns (process, restart flag used)."""
        command = record["command"]
        restart = (["--resume"] if resumable(job.folder, record)
                   else ["--overwrite"] if job.folder.exists() else [])
        why = changes(recorded(job.folder), stored_results(job.folder), record) if job.folder.exists() else ""
        if why:
            print(f"== {job.name}: {why}; running it again")
        job.folder.mkdir(parents=True, exist_ok=True)
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc}"]
                    if job.training and self.nproc > 1 else [sys.executable, "-u"])
        cmd = [*launcher, *command, *restart, "--results_dir", str(job.folder)]
        print(f"\n== {job.name}\n$ {shlex.join(cmd[1:])}", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        return start_child(cmd, env, log), restart

    # ------------------------------------------------------------ all jobs

    def run(self, jobs, parallel=1):
        """Run every job (at most `parallel` at a time); returns {job key: Results}. A failed stage
        does not stop the others: the jobs that do not depend on it still run, then the run stops
        with one line naming it and its log."""
        logs = self.results_dir / "logs"
        done, running, pending, failed, looked_up = {}, {}, list(jobs), {}, {}
        skipped = {}            # job key -> key of the failed stage it waits on, directly or not
        try:
            while pending or running:
                for job in list(pending):       # jobs come after the jobs they depend on
                    cause = next((skipped.get(d, d) for d in job.deps if d in skipped or d in failed), None)
                    if cause is not None:
                        skipped[job.key] = cause
                        pending.remove(job)
                for job in [j for j in pending if all(d in done for d in j.deps)]:
                    if job.key not in looked_up:        # once: a ready job may wait many polls for a slot
                        record = self.record(job, done)
                        looked_up[job.key] = record, self.reusable(job, record)
                    record, reused = looked_up[job.key]
                    if reused is not None:
                        moved = moved_inputs(recorded(job.folder)["command"], record["command"])
                        note = f"; its inputs have the same content at new paths ({moved})" if moved else ""
                        print(f"== {job.name}: done earlier ({job.folder / RESULTS}), reused{note}")
                        done[job.key] = reused
                    elif len(running) < parallel:
                        log = logs / f"{job.key.replace('/', '_')}.log" if parallel > 1 else None
                        running[job.key] = (job, self.launch(job, record, log)[0], time.time(), log, record)
                    else:
                        continue
                    pending.remove(job)
                if not running and pending and not any(all(d in done for d in j.deps) for j in pending):
                    raise UserError(f"jobs {', '.join(j.key for j in pending)} wait on jobs that never ran")
                for key, (job, proc, began, log, record) in list(running.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    del running[key]
                    if code != 0:
                        failed[key] = (job, log)
                        continue
                    self.times[key] = round(time.time() - began, 1)
                    save_json(self.results_dir / TIMES, self.times)
                    save_json(job.folder / RECORD, record)      # only now: the command whose run is here
                    done[key] = finished(job.folder)
                    if parallel > 1:
                        print(f"== {job.name}: finished in {self.times[key]:.0f} s", flush=True)
                if running:
                    time.sleep(POLL_SECONDS)
        except BaseException:
            for _, proc, *_ in running.values():
                stop(proc)
            raise
        if failed:
            raise UserError(failure_line(list(failed.values()), skipped))
        return done


def failure_line(failed, skipped):
    """One line on the stages that failed ([(job, log or None)], the first first): the first one's
    last error line and its log, and the stages that did not run because of it."""
    job, log = failed[0]
    reason = last_error(log) if log else None
    where = f"; its output is in {log}" if log else " (command above)"
    dependents = [key for key, cause in skipped.items() if cause == job.key]
    line = f"stage {job.name!r} failed{f' ({reason})' if reason else ''}{where}"
    if dependents:
        line += f"; not run because of it: {', '.join(dependents)}"
    if len(failed) > 1:
        line += f"; {len(failed) - 1} other stage(s) failed too: {', '.join(repr(j.name) for j, _ in failed[1:])}"
    return line + "; fix it and run again to continue"


def last_error(log):
    """The last `error: ...` line of a stage's log (the last line when there is none), or None."""
    try:
        lines = [line.strip() for line in Path(log).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    errors = [line for line in lines if "error: " in line]
    return (errors or lines or [None])[-1]


def recorded(folder):
    """The runner.json of a stage folder, None when absent or unreadable."""
    try:
        record = json.loads((Path(folder) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("command"), list) else None


def stored_results(folder):
    """The Results of a stage folder's results.json (see finished), None when absent or unreadable."""
    if not (Path(folder) / RESULTS).is_file():
        return None
    try:
        return finished(folder)
    except UserError:
        return None


def resumable(folder, record):
    """True when the folder's checkpoint.pth carries this record's fingerprint: the stage was
    stopped during a run of this very command."""
    path = Path(folder) / "checkpoint.pth"
    if "fingerprint" not in record or not path.is_file():
        return False
    try:
        ckpt = load_checkpoint(path, verify=False)
    except UserError:
        return False
    return isinstance(ckpt, dict) and same_run(ckpt.get("fingerprint"), record["fingerprint"])


def fingerprint_of(command):
    """The fingerprint a stage script computes for `command` ([script, *flags]), None for a script
    that is no stage of this repository."""
    module = stage_module(command[0])
    if module is None:
        return None
    return stage_fingerprint(command[0], module.get_parser().parse_args(command[1:]), module.input_files)


def without_paths(command):
    """The command with the value after every path flag (--teacher PATH, ...) left out: the
    fingerprint stands for the file's content. Other spellings (--teacher=PATH) are kept, so they
    only make a stage run again."""
    return [("<path>" if i and command[i - 1][2:] in PATH_FLAGS and command[i - 1].startswith("--") else token)
            for i, token in enumerate(command)]


def moved_inputs(old, new):
    """'--teacher a -> b' for each path flag whose value differs between two commands that are the
    same but for their paths; '' when none differs (or when they differ otherwise)."""
    if without_paths(old) != without_paths(new):
        return ""
    return ", ".join(f"{new[i - 1]} {a} -> {b}" for i, (a, b) in enumerate(zip(old, new)) if a != b)


def same_command(old, new):
    """True when runner.json's record `old` ran the command of `new` but for the paths of its input
    files, with the same content of its extra inputs."""
    return (old is not None and without_paths(old["command"]) == without_paths(new["command"])
            and sorted(map(str, (old.get("inputs") or {}).values())) == sorted(new["inputs"].values()))


def stage_module(script):
    """The stage script's module (imported once, from the repository root), or None for a script
    that is not one of this repository's stages."""
    path = ROOT / script
    if path.parent != ROOT or not path.is_file():
        return None
    try:
        module = importlib.import_module(path.stem)
    except ImportError:
        return None
    return module if hasattr(module, "input_files") and hasattr(module, "get_parser") else None


def flag_edits(before, now):
    """What differs between two commands (token lists), one readable item each: '--lr 1e-3 -> 5e-3'
    where a flag's value changed, else 'before: <tokens>; now: <tokens>' ('-' for none)."""
    found = []
    for tag, a, b, c, d in difflib.SequenceMatcher(a=before, b=now, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        if tag == "replace" and b - a == d - c == 1 and a and before[a - 1].startswith("--"):
            found.append(f"{before[a - 1]} {before[a]} -> {now[c]}")
        else:
            found.append(f"before: {' '.join(before[a:b]) or '-'}; now: {' '.join(now[c:d]) or '-'}")
    return found


def changes(old, stored, new):
    """Why a stage folder does not hold the run of record `new`, in a few words ('' when nothing
    tells): `old` is its runner.json record and `stored` its Results (None when absent)."""
    reasons, edits = [], []
    if old is not None:
        edits = flag_edits(without_paths(old["command"]), without_paths(new["command"]))
        if edits:
            reasons.append(f"its flags changed ({'; '.join(edits)})")
    ran = stored.fingerprint if stored is not None and isinstance(stored.fingerprint, dict) else (old or {}).get(
        "fingerprint")
    if isinstance(ran, dict) and "fingerprint" in new:
        found = differences({**ran, "stage": None}, {**new["fingerprint"], "stage": None})
        inputs, flags = [d for d in found if not d.startswith("--")], [d for d in found if d.startswith("--")]
        if inputs:
            reasons.append(f"its inputs changed ({'; '.join(inputs)})")
        if flags and not edits:
            reasons.append(f"its results.json is from another command ({'; '.join(flags)})")
    moved = moved_inputs(old["command"], new["command"]) if old is not None else ""
    if moved:
        reasons.append(f"an input's path changed ({moved})")
    changed = [p for p, h in new["inputs"].items() if (old or {}).get("inputs", {}).get(p) not in (None, h)]
    if changed and not reasons:
        reasons.append(f"its input {', '.join(changed)} changed")
    return "; ".join(reasons)


def finished(folder):
    """A stage folder's Results, its encoder (if it names one) as a full path."""
    results = Results.load(Path(folder) / RESULTS)
    if results.stage != "downstream" and results.encoder:
        results.encoder = str(results.encoder_file(folder))
    return results


def hold_runner_lock(results_dir):
    """One runner per results folder, held until the process ends; a second one is refused before
    it writes anything."""
    Path(results_dir).mkdir(parents=True, exist_ok=True)
    return RunLock(results_dir).acquire()


# ---------------------------------------------------------------- child processes

def _die_with_parent():
    """In the child: ask Linux to end it when the runner dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_child(cmd, env, log=None):
    """Start a stage in the repository root; its output goes to the terminal, or to `log`."""
    out = None
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "a")
    try:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    finally:
        if out is not None:
            out.close()


def stop(proc):
    """Stop a stage (the runner was interrupted), so a re-run never finds a second writer in its folder."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
