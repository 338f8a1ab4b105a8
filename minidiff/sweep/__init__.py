"""`minidiff sweep SPEC`: many generations (prompts x schedulers x steps x guidance x seeds) over torch.distributed.

    spec.py     the spec file -> a validated Spec -> the list of Jobs, each with a stable id
    runner.py   one process, or one rank of `torchrun`: this rank's share of the jobs, resumable
    claims.py   a claim file per job, so that concurrent runners on one folder do each job once
    report.py   the comparison grids and index.html, made by rank 0 at the end

docs/sweep.md says how to run it on one machine, on N GPUs and on several hosts.
"""

from minidiff.sweep.spec import Job, Spec, expand_jobs, load_spec

__all__ = ["Job", "Spec", "expand_jobs", "load_spec"]
