"""Multi-node runs under batch schedulers: ``keizoku launch`` (inside an allocation), ``keizoku submit``
(job scripts, chains of jobs, containers) and ``keizoku status``.

One module per concern: ``schedulers`` (Grid Engine, PBS, Slurm, local: one class each — allocations, job
script directives, walltimes, submission, queue states), ``port`` (a rendezvous port no other job on the node
holds), ``ranks`` (MPI/PMI/Slurm task variables → torch's), ``driver`` (the per-job launcher and its starters),
``agent`` (the per-node launcher), ``worker`` (one MPI-style process), ``profile`` (site profiles, YAML),
``script`` (job scripts), ``submit`` (submission, chains, job records), ``status`` (what a run has done:
steps, checkpoints, jobs). The driver and what it imports (``schedulers``, ``port``, ``keizoku.rundir``) use
only the standard library so that the driver can run outside a container.
"""
