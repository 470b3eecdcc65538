"""Multi-node runs under batch schedulers: ``keizoku launch`` (inside an allocation), ``keizoku submit``
(job scripts, chains of jobs, containers) and ``keizoku status``.

One module per concern: ``allocation`` (hosts from Grid Engine / PBS / Slurm variables), ``port`` (a
rendezvous port no other job on the node holds), ``ranks`` (MPI/PMI/Slurm task variables → torch's),
``driver`` (the per-job launcher), ``agent`` (the per-node launcher), ``worker`` (one MPI-style process),
``profile`` (site profiles, YAML), ``script`` (job scripts and scheduler commands), ``submit`` (submission,
chains, job records), ``progress`` (what a run has done: steps, checkpoints, jobs). The driver, agent and
their helpers use only the standard library so that the driver can run outside a container.
"""
