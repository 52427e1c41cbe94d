"""Run the pipeline's jobs as stage scripts, in dependency order, up to --jobs of them side by side.

A job is one stage script run into its own folder. It is reused when its folder holds the
results of the same command (results.json, and the model file it names); resumed when it holds a
checkpoint.pth of that command; run again from scratch (--overwrite) when its command changed. An
upstream stage run again writes a new model file, so every job downstream of it changes too.

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
from utils.fingerprint import differences, file_hash, stage_fingerprint
from utils.files import save_json
from utils.lock import RunLock
from utils.records import RESULTS, Results

ROOT = Path(__file__).resolve().parent.parent
RECORD = "runner.json"          # in each stage folder: the command the runner ran there
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
        """What decides the stage's result, as runner.json holds it: its command (without
        --results_dir and restart flags) and the stage's fingerprint for that command
        (utils.fingerprint, computed by the stage script's own parser and input_files, as the stage
        itself computes it: its result-changing flags and the sha256 of every file it reads), plus
        the hash of the job's extra inputs. A script that is no stage module of this repository
        (tests) is fingerprinted by the files its command names."""
        command = [job.script, *map(str, job.args(done)), *self.common]
        extra = {str(p): file_hash(ROOT / p) for p in job.inputs}
        module = stage_module(job.script)
        if module is None:
            named = [t for t in command if (ROOT / t).is_file()]
            return {"command": command, "inputs": {**{t: file_hash(ROOT / t) for t in named}, **extra}}
        args = module.get_parser().parse_args(command[1:])
        return {"command": command, "fingerprint": stage_fingerprint(job.script, args, module.input_files),
                "inputs": extra}

    def reusable(self, job, record):
        """The job's Results when its folder holds the finished run of this very record, else None."""
        if not ((job.folder / RESULTS).exists() and recorded(job.folder) == record):
            return None
        found = finished(job.folder)
        return found if found.encoder == "" or Path(found.encoder).exists() else None

    def launch(self, job, record, log):
        """Start the stage; returns (process, restart flag used)."""
        command = record["command"]
        restart = (["--resume"] if recorded(job.folder) == record and (job.folder / "checkpoint.pth").exists()
                   else ["--overwrite"] if job.folder.exists() else [])
        if job.folder.exists() and recorded(job.folder) not in (None, record):
            print(f"== {job.name}: {changes(recorded(job.folder), record)}; running it again")
        job.folder.mkdir(parents=True, exist_ok=True)
        save_json(job.folder / RECORD, record)
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
        done, running, pending, failed, looked_up = {}, {}, list(jobs), [], {}
        try:
            while pending or running:
                blocked = {j.key for j in pending if any(d in {f.key for f, _ in failed} for d in j.deps)}
                pending = [j for j in pending if j.key not in blocked]
                failed += [(j, None) for j in jobs if j.key in blocked]
                for job in [j for j in pending if all(d in done for d in j.deps)]:
                    if job.key not in looked_up:        # once: a ready job may wait many polls for a slot
                        record = self.record(job, done)
                        looked_up[job.key] = record, self.reusable(job, record)
                    record, reused = looked_up[job.key]
                    if reused is not None:
                        print(f"== {job.name}: done earlier ({job.folder / RESULTS}), reused")
                        done[job.key] = reused
                    elif len(running) < parallel:
                        log = logs / f"{job.key.replace('/', '_')}.log" if parallel > 1 else None
                        running[job.key] = (job, self.launch(job, record, log)[0], time.time(), log)
                    else:
                        continue
                    pending.remove(job)
                if not running and pending and not any(all(d in done for d in j.deps) for j in pending):
                    raise UserError(f"jobs {', '.join(j.key for j in pending)} wait on jobs that never ran")
                for key, (job, proc, began, log) in list(running.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    del running[key]
                    if code != 0:
                        failed.append((job, log))
                        continue
                    self.times[key] = round(time.time() - began, 1)
                    save_json(self.results_dir / TIMES, self.times)
                    done[key] = finished(job.folder)
                    if parallel > 1:
                        print(f"== {job.name}: finished in {self.times[key]:.0f} s", flush=True)
                if running:
                    time.sleep(POLL_SECONDS)
        except BaseException:
            for _, proc, _, _ in running.values():
                stop(proc)
            raise
        if failed:
            job, log = failed[0]          # the first to fail; the rest depend on a failed stage
            where = f"; its output is in {log}" if log else " (command above)"
            after = len(failed) - 1
            skipped = f"; {after} stage(s) after it did not run" if after else ""
            raise UserError(f"stage {job.name!r} failed{where}{skipped}; fix it and run again to continue")
        return done


def recorded(folder):
    """The runner.json of a stage folder, None when absent or unreadable."""
    try:
        return json.loads((Path(folder) / RECORD).read_text())
    except (OSError, ValueError):
        return None


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


def changes(old, new):
    """How two runner.json records differ, in a few words."""
    if old.get("command") == new["command"] and "fingerprint" in old and "fingerprint" in new:
        found = differences(old["fingerprint"], new["fingerprint"])
        if found:
            return f"its inputs changed ({'; '.join(found)})"
    before, now = old.get("command", []), new["command"]
    edits = [(before[a:b], now[c:d]) for tag, a, b, c, d in difflib.SequenceMatcher(a=before, b=now).get_opcodes()
             if tag != "equal"]
    if edits:
        gone, added = (" ".join(t for edit in edits for t in edit[i]) for i in (0, 1))
        return f"its flags changed (before: {gone or '-'}; now: {added or '-'})"
    changed = [p for p, h in new["inputs"].items() if old.get("inputs", {}).get(p) != h]
    return f"its input {', '.join(changed)} changed" if changed else "its record changed"


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
