"""What a run shows and records: progress bars, the per-epoch log files, the non-finite loss guard."""
import csv
import json
import math
from pathlib import Path

from tqdm import tqdm

from .distributed import is_main
from .files import atomic_write, save_json
from .records import LOG, read_log
from .errors import UserError


def progress(iterable, desc, **kwargs):
    """A tqdm bar, shown in the main process only, refreshed at most once a second."""
    kwargs.setdefault("leave", False)
    kwargs.setdefault("mininterval", 1)
    return tqdm(iterable, desc=desc, disable=not is_main(), **kwargs)


class RunLog:
    """args.json at start, then one JSON line (log.jsonl) and one CSV row (log.csv) per epoch."""

    def __init__(self, out_dir, args, resume_epoch=None):
        self.dir = Path(out_dir)
        self.jsonl = self.dir / LOG
        self.csv = self.dir / "log.csv"
        self.writes = is_main()             # under torchrun only rank 0 writes
        if not self.writes:
            return
        save_json(self.dir / "args.json", vars(args))
        if resume_epoch is None:
            for f in (self.jsonl, self.csv):
                f.unlink(missing_ok=True)
        else:
            self._truncate(resume_epoch)

    def _truncate(self, last_epoch):
        """On resume drop log lines of epochs after the checkpoint, which will be redone."""
        rows = [r for r in self.read() if r.get("epoch", 0) <= last_epoch]
        for f in (self.jsonl, self.csv):
            f.unlink(missing_ok=True)
        for row in rows:
            self.log(row, echo=False)

    def read(self):
        """The logged rows; a line cut short by a kill (the last one) is dropped."""
        return read_log(self.jsonl)

    def log(self, row, echo=True, prefix=""):
        """Append one epoch's row to log.jsonl and log.csv (and print it, after prefix)."""
        if not self.writes:
            return
        if echo:
            print(prefix + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in row.items()))
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self._append_csv(row)

    def _append_csv(self, row):
        """One CSV row; when a row brings a column the header lacks (stage 0's knn_acc first comes
        at epoch --knn_freq), the file is rewritten from log.jsonl with every column."""
        header = []
        if self.csv.exists():
            with open(self.csv, newline="") as fh:
                header = next(csv.reader(fh), [])
        if header and all(k in header for k in row):
            with open(self.csv, "a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=header).writerow(row)
            return
        rows = self.read()
        columns = list(dict.fromkeys(k for r in rows for k in r))

        def write(tmp):
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
        atomic_write(self.csv, write)

def check_finite(value, epoch, step=None, out_dir=None, what="loss"):
    """Stop on a NaN or infinite loss. A training stage passes its step and folder: the checkpoint
    of the previous epoch there is left as it was, ready for --resume. Without a folder (stage 3,
    which keeps no checkpoint) the message names `what` and advises a new run."""
    value = float(value)
    if math.isfinite(value):
        return
    if out_dir is None:
        raise UserError(f"the {what} became {value} at epoch {epoch}; stopped. Lower --lr and run again")
    raise UserError(f"loss became {value} at epoch {epoch}, step {step}; stopped. The last good "
                    f"checkpoint is {Path(out_dir) / 'checkpoint.pth'} (lower --lr and --resume)")
