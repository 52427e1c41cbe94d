"""The one-command pipeline behind run_pipeline.py, one concern a module:

    presets   the demo's and the paper's stage flags, as data
    data      which datasets and tasks a run uses, checked before any work
    plan      the stages of each seed as jobs with their dependencies
    runner    runs the jobs as stage scripts, side by side (--jobs), reusing finished ones
    summary   each seed's table and demo checks, the summary over seeds
    samples   the sample-image grid and the figures of a results folder
"""
