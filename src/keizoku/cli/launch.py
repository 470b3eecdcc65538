"""``keizoku launch``, ``keizoku submit`` and ``keizoku status``: multi-node runs under batch schedulers."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from keizoku.cli.app import app, error, load_config_or_exit, log, out
from keizoku.rundir import ExitCode


def _launch_profile(name: Optional[str], sets: Optional[list[str]]):
    from keizoku.launch.profile import ProfileError, load_profile

    try:
        return load_profile(name, sets or []) if name else None
    except ProfileError as e:
        for line in str(e).splitlines():
            error(line)
        raise typer.Exit(ExitCode.CONFIG) from None


def _plan_here(config: Path, overrides: list[str], cfg, prof, starter: Optional[str], launcher: Optional[str],
               nproc_per_node: int):
    """The launch plan of `keizoku launch` in this allocation: flags, else the profile, else the scheduler's
    native starter (a profile written for another scheduler keeps its launcher, not its starter)."""
    from keizoku.launch.driver import LaunchPlan
    from keizoku.launch.schedulers import scheduler_of
    from keizoku.schedule import run_length

    scheduler = scheduler_of(os.environ)
    plan = LaunchPlan(train_args=[str(config), *overrides], run_dir=str(Path(cfg.run_dir).resolve()),
                      total_steps=run_length(cfg).steps, workdir=os.getcwd(),
                      launcher=launcher or (prof.launcher if prof else "node"),
                      starter=starter or (prof.starter if prof and prof.scheduler == scheduler.name
                                          else scheduler.native_starter),
                      procs_per_node=nproc_per_node or (prof.procs_per_node or prof.gpus_per_node if prof else 0))
    if prof:
        plan.env, plan.mpirun, plan.failure_grace_s = dict(prof.env), list(prof.mpirun), prof.failure_grace_s
    return plan


@app.command()
def launch(
    config: Annotated[Path, typer.Argument(help="A keizoku YAML config.", show_default=False)],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key.path=value overrides.", show_default=False)] = None,
    profile: Annotated[Optional[str], typer.Option("--profile", "-p", help="Site profile (name or YAML file) for "
                                                   "the launcher, starter, environment; default: by scheduler.")] = None,
    starter: Annotated[Optional[str], typer.Option(help="srun, mpirun, pbsdsh, qrsh, ssh or local (default: srun "
                                                   "under Slurm, qrsh under Grid Engine, pbsdsh under PBS).")] = None,
    launcher: Annotated[Optional[str], typer.Option(help="node (an agent per node) or mpi (a process per GPU "
                                                    "from the starter).")] = None,
    nproc_per_node: Annotated[int, typer.Option(help="Training processes per node (0: one per visible GPU, or 1).")] = 0,
    allow_changes: Annotated[bool, typer.Option("--allow-changes", help="Passed to keizoku train: let a run that has "
                                                "trained change what it trains (recorded in the run).")] = False,
) -> None:
    """Run training on the nodes of the current allocation (inside a qsub/sbatch job, or on this machine).

    Reads the scheduler's variables (Grid Engine PE_HOSTFILE, PBS_NODEFILE, SLURM_JOB_NODELIST; none: this
    machine), picks the rendezvous (this host, a port no other job here holds), starts one agent per node
    (srun, mpirun, pbsdsh, qrsh -inherit, ssh) that starts a training process per GPU, relays the
    walltime warning (SIGUSR1/SIGUSR2/SIGTERM: save and exit 3) and stops every node if one fails. Exits at
    once with 0 when the run is already complete. Started as one of several tasks by mpirun or srun, it is
    one training process: ranks from OMPI_COMM_WORLD_*, PMI_*, SLURM_PROCID, ...

    Exit status: 0 done, 1 failed (or the failed rank's status), 2 bad config, 3 stopped after saving.
    """
    from keizoku.launch.driver import LaunchError, launch_job
    from keizoku.launch.port import PortError
    from keizoku.launch.ranks import RankError, from_env
    from keizoku.launch.schedulers import AllocationError

    try:
        in_mpi = from_env(os.environ) is not None
    except RankError as e:
        error(str(e))
        raise typer.Exit(ExitCode.CONFIG) from None
    if in_mpi:  # one rank of a user's `mpirun ... keizoku launch CONFIG`
        from keizoku.launch.worker import exec_train

        exec_train([str(config), *(overrides or []), *["--allow-changes"] * allow_changes])
    cfg = load_config_or_exit(config, overrides, exit_code=ExitCode.CONFIG)
    prof = _launch_profile(profile, None)
    train_args = [*(overrides or []), *["--allow-changes"] * allow_changes]
    try:
        status = launch_job(_plan_here(config, train_args, cfg, prof, starter, launcher, nproc_per_node))
    except (LaunchError, AllocationError, PortError) as e:
        error(str(e))
        raise typer.Exit(ExitCode.CONFIG) from None
    raise typer.Exit(status)


@app.command()
def submit(
    config: Annotated[Path, typer.Argument(help="A keizoku YAML config.", show_default=False)],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key.path=value overrides.", show_default=False)] = None,
    profile: Annotated[str, typer.Option("--profile", "-p", help="Site profile: tsubame4, abci3, slurm, local, "
                                         "one of yours (~/.config/keizoku/profiles/NAME.yaml) or a YAML file.",
                                         show_default=False)] = ...,
    nodes: Annotated[Optional[int], typer.Option("--nodes", "-N", help="Nodes per job.", min=1)] = None,
    walltime: Annotated[Optional[str], typer.Option("--walltime", help="Time limit per job, HH:MM:SS or D-HH:MM:SS "
                                                    "(written as HH:MM:SS for Grid Engine and PBS).")] = None,
    chain: Annotated[int, typer.Option(help="Submit K jobs, each waiting for the previous one (afterany) and "
                                       "resuming from the newest checkpoint; spare ones exit at once.", min=1)] = 1,
    container: Annotated[Optional[Path], typer.Option(help="Run training in this Apptainer image (.sif): "
                                                      "apptainer exec --nv -B ... IMAGE.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a profile setting: key=value "
                                                      "(e.g. group=tga12345, queue=gpu, env.NCCL_DEBUG=INFO).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Job name (default: keizoku-RUN_DIR_NAME).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the job script, its launch plan, the launch "
                                          "lines (srun/mpirun/qrsh ...) and the submit commands; write and submit "
                                          "nothing.")] = False,
    allow_changes: Annotated[bool, typer.Option("--allow-changes", help="Passed to keizoku train: let a run that has "
                                                "trained change what it trains (recorded in the run).")] = False,
) -> None:
    """Write a job script for a site profile into the run directory and submit it (a chain with --chain).

    The script asks for the scheduler's walltime warning (Grid Engine -notify, Slurm --signal), runs
    `keizoku launch` on the job's nodes, and records job ids in RUN_DIR/jobs.jsonl (see keizoku status).
    Profiles are YAML: copy a shipped one to ~/.config/keizoku/profiles/ or write one with base: NAME.
    qsub/sbatch is tried again (submit_retry_s) when the scheduler cannot be reached.

    Exit status: 0 submitted; 1 qsub/sbatch refused the job or could not reach the scheduler (nothing
    queued: the job script and plan are removed), or the local job failed; 2 bad config or profile.

    To tokenize on many nodes instead: keizoku submit tokenize --profile NAME --tasks N -- TOKENIZE ARGS
    (keizoku submit tokenize --help); to evaluate on a node: keizoku submit eval --profile NAME -- EVAL ARGS.
    """
    import shlex

    from keizoku.errors import KeizokuError
    from keizoku.launch.schedulers import scheduler_named
    from keizoku.launch.submit import submit_jobs

    cfg = load_config_or_exit(config, overrides, exit_code=ExitCode.CONFIG)
    sets = list(set_ or []) + ([f"nodes={nodes}"] if nodes else []) + ([f"walltime={walltime}"] if walltime else [])
    prof = _launch_profile(profile, sets)
    try:
        train_args = [*(overrides or []), *["--allow-changes"] * allow_changes]
        result = submit_jobs(cfg, config, train_args, prof, chain=chain, container=container,
                             dry_run=dry_run, name=name, command=shlex.join(["keizoku", "submit", *sys.argv[2:]]),
                             log=log)
    except (KeizokuError, ValueError, OSError) as e:  # ValueError: a job id the scheduler's output did not give
        error(str(e))
        raise typer.Exit(ExitCode.FAILED) from None
    if dry_run:
        print(f"# {result.script} (dry run: not written)\n{result.script_text}")
        print(f"# {result.plan} (dry run: not written), which the launch driver reads:")
        print("".join(f"#   {line}\n" for line in result.plan_text.splitlines()), end="")
        last = f"..NODE{prof.nodes - 1}" if prof.nodes > 1 else ""
        print(f"# in each job the launch driver would start (NODE0{last}: the job's {prof.nodes} host(s), NODE0 the "
              f"batch host; PORT, JOB_ID: known when the job starts):")
        for line in result.launch_lines:
            print(f"#   {shlex.join(line)}")
        print("# and so, with the variables torchrun would set (also LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK), each "
              "training process:")
        print(f"#   {' '.join(result.training_line[:4])} {shlex.join(result.training_line[4:])}")
        print("# would run:")
        for cmd in result.commands:
            print(f"#   {shlex.join(cmd)}")
        return
    log(f"job script {result.script}; follow with: keizoku status {Path(cfg.run_dir)}")
    if result.job_ids and scheduler_named(prof.scheduler).queues_jobs:
        print(" ".join(result.job_ids))


def _sharded_tokenize_status(parts: Path, as_json: bool) -> bool:
    """``keizoku status PARTS`` (the parts directory of keizoku submit tokenize): its shares' states, as
    ``keizoku tokenize-merge --check`` prints them. False if ``parts`` is no such directory."""
    from keizoku.cli.data import show_shares
    from keizoku.data.shards import read_plan
    from keizoku.errors import KeizokuError

    try:
        plan = read_plan(parts)
    except KeizokuError:
        return False
    if plan is None:
        return False
    out_dir, prefix = plan.output.get("dir"), plan.output.get("prefix")
    show_shares(out_dir, prefix, as_json)
    if not as_json:
        log(f"(the shares of keizoku tokenize {'--output-dir ' + out_dir if out_dir else '--output-prefix ' + prefix}; "
            f"its jobs and their logs: {parts / 'jobs.jsonl'})")
    return True


@app.command("submit-tokenize", hidden=True)  # spelled `keizoku submit tokenize` (cli.main routes it here)
def submit_tokenize(
    tokenize_args: Annotated[list[str], typer.Argument(
        help="After --: the arguments of keizoku tokenize (inputs, --tokenizer, --output-dir or --output-prefix, "
        "flags), as you would run it on one machine.", show_default=False, metavar="-- TOKENIZE_ARGS")],
    profile: Annotated[str, typer.Option("--profile", "-p", help="Site profile, as for training: tsubame4, abci3, "
                                         "slurm, local, one of yours or a YAML file.", show_default=False)] = ...,
    tasks: Annotated[int, typer.Option("--tasks", help="Array tasks: the inputs are cut into this many "
                                       "shares of about equal size, one per task (one node each).", min=1,
                                       show_default=False)] = ...,
    walltime: Annotated[Optional[str], typer.Option("--walltime", help="Time limit per task and for the merge, "
                                                    "HH:MM:SS or D-HH:MM:SS.")] = None,
    merge: Annotated[bool, typer.Option(help="Submit the merge job (keizoku tokenize-merge), to run once every "
                                        "task has succeeded.")] = True,
    remove_parts: Annotated[bool, typer.Option("--remove-parts", help="Have the merge delete the parts once "
                                               "everything is merged (kept by default).")] = False,
    container: Annotated[Optional[Path], typer.Option(help="Run keizoku in this Apptainer image (.sif).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a profile setting: key=value (e.g. "
                                                      "queue=cpu, gpus_per_node=0, group=tga12345).")] = None,
    name: Annotated[Optional[str], typer.Option(help="The array job's name (default: "
                                                "keizoku-tokenize-OUTPUT).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the shares, both job scripts and the submit "
                                          "commands; write and submit nothing.")] = False,
) -> None:
    """Tokenize on many nodes: an array job of N tasks, task K running `keizoku tokenize ARGS --shard K/N`, then a
    merge job (`keizoku tokenize-merge`) once all have succeeded: the same datasets as one `keizoku tokenize ARGS`.

    Task K tokenizes share K: the inputs, in order, cut into N parts of about equal size (whole files; a large
    uncompressed .jsonl also into byte ranges at line starts), into OUTPUT/parts/shard-K-of-N (--output-prefix P:
    P.parts/...). A task run again skips what its share has finished. Grid Engine: -t 1-N and -hold_jid (the
    merge runs however the tasks ended and names the shares that did not finish); Slurm: --array=1-N and
    --dependency=afterok; PBS: -J 1-N and -W depend=afterok. Scripts, logs and jobs.jsonl go in the parts
    directory; keizoku tokenize-merge --check shows each share and its task's log.

    Example:

        keizoku submit tokenize --profile tsubame4 --set group=tga12345 --tasks 16 -- data/ja -t ./tok -o tokenized/ja

    Exit status: 0 submitted (--profile local: every task and the merge succeeded); 1 qsub/sbatch refused or
    could not reach the scheduler, or a local task failed; 2 bad arguments, inputs or profile (nothing written).
    """
    import shlex

    import click

    from keizoku.cli.data import tokenize_options
    from keizoku.errors import KeizokuError
    from keizoku.launch.schedulers import scheduler_named
    from keizoku.launch.submit import SubmitError
    from keizoku.launch.submit import submit_tokenize as submit_jobs

    try:
        parsed = typer.main.get_command(app).commands["tokenize"].make_context("keizoku tokenize",
                                                                               list(tokenize_args))
    except click.ClickException as e:
        error(f"the tokenize arguments (after --): {e.format_message()}")
        raise typer.Exit(ExitCode.CONFIG) from None
    if parsed.params.get("shard") is not None:
        error("--shard: each task gets its own (--shard K/N); leave it out of the tokenize arguments")
        raise typer.Exit(ExitCode.CONFIG)
    # one node a task, and no walltime warning to ask for (training's): a share resumes from its finished datasets
    sets = list(set_ or []) + ["nodes=1", "warning_signal_s=0", "stop_margin_s=0"] + \
        ([f"walltime={walltime}"] if walltime else [])
    prof = _launch_profile(profile, sets)
    opts = tokenize_options(parsed.params)
    try:
        result = submit_jobs(list(tokenize_args), opts, prof, tasks=tasks, merge=merge, remove_parts=remove_parts,
                             container=container, dry_run=dry_run, name=name, log=log,
                             command=shlex.join(["keizoku", "submit", "tokenize",
                                                 *sys.argv[3 if sys.argv[1:3] == ["submit", "tokenize"] else 2:]]))
    except SubmitError as e:
        error(str(e))
        raise typer.Exit(ExitCode.FAILED) from None
    except (KeizokuError, OSError, ValueError) as e:  # the inputs or the parts' plan: nothing was written
        error(str(e))
        raise typer.Exit(ExitCode.CONFIG) from None
    plan = result.plan
    if dry_run:
        print(f"# {result.task_script} (dry run: not written)\n{result.task_text}")
        if result.merge_text:
            print(f"# {result.merge_script} (dry run: not written)\n{result.merge_text}")
        total = sum(i["size"] for i in plan.inputs)
        print(f"# the shares ({result.parts}/plan.json: {len(plan.inputs)} input(s), {total / 1e6:,.1f} MB, cut into "
              f"{plan.shares}):")
        for k in range(1, plan.shares + 1):
            print(f"#   {k}: {plan.describe(k)}")
        print("# would run:")
        for cmd in result.commands:
            print(f"#   {shlex.join(cmd)}")
        return
    output = f"--output-dir {opts.output_dir}" if opts.output_dir is not None else \
        f"--output-prefix {opts.output_prefix}"
    log(f"job scripts in {result.parts}/submit; follow with: keizoku tokenize-merge {output} --check "
        f"(or keizoku status {result.parts})")
    if result.job_ids and scheduler_named(prof.scheduler).queues_jobs:
        print(" ".join(result.job_ids))


@app.command("submit-eval", hidden=True)  # spelled `keizoku submit eval` (cli.main routes it here)
def submit_eval(
    eval_args: Annotated[list[str], typer.Argument(
        help="After --: the arguments of keizoku eval (PATH, --tasks, --step, ...), as you would run it here.",
        show_default=False, metavar="-- EVAL_ARGS")],
    profile: Annotated[str, typer.Option("--profile", "-p", help="Site profile, as for training: tsubame4, abci3, "
                                         "slurm, local, one of yours or a YAML file.", show_default=False)] = ...,
    walltime: Annotated[Optional[str], typer.Option("--walltime", help="Time limit of the job, HH:MM:SS or "
                                                    "D-HH:MM:SS.")] = None,
    container: Annotated[Optional[Path], typer.Option(help="Run keizoku in this Apptainer image (.sif).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a profile setting: key=value (e.g. "
                                                      "gpus_per_node=1, queue=gpu_1, group=tga12345).")] = None,
    name: Annotated[Optional[str], typer.Option(help="The job's name (default: keizoku-eval-RUN[-STEP]).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the job script and the submit command; write "
                                          "and submit nothing.")] = False,
) -> None:
    """Evaluate on a node of the cluster: one job (one node) that runs `keizoku eval EVAL_ARGS`.

    What eval.downstream does for each due checkpoint of a run trained under a scheduler. The job script goes into
    the run directory (RUN_DIR/submit/SID.eval-step_N.sh; the job's output in RUN_DIR/logs; the job in
    RUN_DIR/eval/jobs.jsonl), or for a Hugging Face model into its results directory (--out). keizoku eval's
    --device defaults to auto: the job's GPU if the profile gives it one (gpus_per_node), else its CPUs.

    Example:

        keizoku submit eval --profile tsubame4 --set group=tga12345 -- runs/my-run --step 2000 --tasks ja

    Exit status: 0 submitted (--profile local: evaluated); 1 qsub/sbatch refused or could not reach the
    scheduler, or the local eval failed; 2 bad arguments or profile (nothing written).
    """
    import shlex

    import click

    from keizoku.downstream import EVAL_JOB_SETTINGS, EvalError, default_out, expand_tasks, resolve
    from keizoku.errors import KeizokuError
    from keizoku.launch.schedulers import scheduler_named
    from keizoku.launch.submit import submit_eval as submit_job

    try:
        parsed = typer.main.get_command(app).commands["eval"].make_context("keizoku eval", list(eval_args))
    except click.ClickException as e:
        error(f"the eval arguments (after --): {e.format_message()}")
        raise typer.Exit(ExitCode.CONFIG) from None
    params = parsed.params
    if not expand_tasks(params["tasks"]):
        error("the eval arguments (after --): --tasks: no task given")
        raise typer.Exit(ExitCode.CONFIG)
    try:  # what keizoku eval would refuse at once: the path, the checkpoint
        target = resolve(params["path"], params["step"], params["out_dir"])
    except EvalError as e:
        error(str(e))
        raise typer.Exit(ExitCode.CONFIG) from None
    if target.run is not None:
        home, jobs = target.run.path, target.run.path / "eval" / "jobs.jsonl"
    else:
        home = target.results_dir if params["out_dir"] is not None else default_out(params["path"])
        jobs = home / "jobs.jsonl"
    sets = list(set_ or []) + list(EVAL_JOB_SETTINGS) + ([f"walltime={walltime}"] if walltime else [])
    prof = _launch_profile(profile, sets)
    binds = tuple(str(Path(p).resolve()) for p in [params["path"], *(params["include_path"] or [])])
    try:
        result = submit_job(list(eval_args), home, jobs, prof, step=params["step"], container=container, binds=binds,
                            dry_run=dry_run, name=name, log=log,
                            command=shlex.join(["keizoku", "submit", "eval",
                                                *sys.argv[3 if sys.argv[1:3] == ["submit", "eval"] else 2:]]))
    except (KeizokuError, OSError) as e:  # SubmitError among them: the scheduler refused the job
        error(str(e))
        raise typer.Exit(ExitCode.FAILED) from None
    if dry_run:
        print(f"# {result.script} (dry run: not written)\n{result.script_text}")
        print("# would run:")
        for cmd in result.commands:
            print(f"#   {shlex.join(cmd)}")
        return
    if result.job_ids and scheduler_named(prof.scheduler).queues_jobs:
        print(" ".join(result.job_ids))


@app.command()
def status(
    run_dir: Annotated[Path, typer.Argument(help="A keizoku run directory.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Jobs of a run and their states, the last step, loss and tokens, and the newest checkpoint.

    States (docs/launch.md has what each means and what to do): pending, held, running, completed, stopped
    after saving, failed (which rank, on which node, how), cancelled (scancel/qdel), lost (the launch driver
    ended without recording how: killed, node down; or silent for 120 s), submitted (the scheduler could not be
    asked). A failed, lost or cancelled job gets a line below the table saying what to do.

    Exit status: 0 the status was printed (whatever the jobs' states); 1 no such run directory.
    """
    import json

    from keizoku.launch.status import run_status

    if not run_dir.is_dir():
        error(f"{run_dir}: no such run directory")
        raise typer.Exit(ExitCode.FAILED)
    if _sharded_tokenize_status(run_dir, as_json):
        return
    s = run_status(run_dir)
    if as_json:
        print(json.dumps(s.to_dict(), indent=1))
        return
    table = Table(title=f"{run_dir} — jobs ({s.scheduler or 'none recorded'})", title_justify="left")
    for col in ("job", "chain", "state", "exit", "hosts", "detail"):
        table.add_column(col, overflow="fold")
    for j in s.jobs:
        table.add_row(j.job_id, f"{j.link}/{j.of}" if j.link else "", j.state,
                      "" if j.exit_status is None else str(j.exit_status), ",".join(j.hosts[:4]), j.detail)
    out.print(table)
    for j in s.jobs:
        if j.advice:
            out.print(f"job {j.job_id} {j.state}: {j.detail}; {j.advice}", highlight=False, markup=False,
                      soft_wrap=True)
    if s.query_error:
        out.print(f"{s.query_error}: the states are the launch driver's records; try again once it answers",
                  highlight=False, markup=False, soft_wrap=True)
    if s.last:
        total = f" of {s.total_steps}" if s.total_steps else ""
        phase = f" · phase {s.last['phase']}" if s.last.get("phase") else ""
        out.print(f"step {s.last['step']}{total}{phase} · loss {s.last['loss']:.4f} · tokens {s.last['tokens']:,}",
                  highlight=False, markup=False)
    else:
        out.print("no training step recorded yet", highlight=False)
    out.print(f"latest checkpoint: {s.checkpoint or 'none'}", highlight=False, soft_wrap=True)
