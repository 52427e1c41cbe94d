"""Scaffolding shared by the stage scripts, one module per concern.

    errors       UserError, the failure reported as one line
    files        atomic writes, JSON, weights-only checkpoint loading
    device       --device, bf16 autocast, channels-last
    seeding      seeds and resumable RNG states
    distributed  torchrun: ranks, process group, collectives, DDP
    logs         progress bars, log.jsonl/log.csv, the non-finite loss guard
    checks       the validation layer: flag types, data, trigger, checkpoint and resume checks
    lock         one writer per results folder
    cli          the shared flags and the one-line error wrapper
    stage        the opening of a run, resume, and the per-epoch checkpoint files

models/ and datasets/ import only errors, files, logs and checks; nothing is re-exported here, so
importing one module does not load the others.
"""
