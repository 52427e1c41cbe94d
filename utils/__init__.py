"""Scaffolding shared by the stage scripts, one module per concern.

    errors       UserError, the failure reported as one line
    files        atomic writes, JSON, weights-only checkpoint loading
    device       --device, bf16 autocast, channels-last
    seeding      seeds and resumable RNG states
    distributed  torchrun: ranks, process group, collectives, DDP
    logs         progress bars, log.jsonl/log.csv, the non-finite loss guard
    lock         one writer per results folder
    cli          flag types, the shared flags and the one-line error wrapper
    fingerprint  what makes two runs of a stage the same run (flags and input file hashes)
    records      the files passed between stages, each defined once
    stage        the opening of a run, resume, and the per-epoch checkpoint files

models/ and datasets/ import errors, files and logs, and besides those: models/distill.py device
(autocast) and distributed (the loss averaged over processes), datasets/loader.py distributed (each
process's share of a batch), datasets/poison.py fingerprint (file_hash), datasets/demo.py cli
(its command line) and datasets/attack.py cli (the flag types of the attacks' data flags). None of them imports lock, seeding, stage or records. Nothing is re-exported here, so
importing one module does not load the others.
"""
