"""``arrakis-ray sweep``, ``jobs``, ``schedule`` and ``scheduler``: sweeps run here or
submitted to a Ray cluster as Ray Jobs, and cron schedules of them.

Nothing here imports Ray at module level: ``sweep --dry-run`` plans without Ray, and the
Jobs commands only talk HTTP to the cluster's dashboard.
"""

from __future__ import annotations

from datetime import UTC, datetime

from arrakis_ray.errors import ConfigError

STORE_HELP = "store directory, or a URI such as s3://bucket/prefix"
ADDRESS_HELP = "the Ray cluster's Jobs API (its dashboard), e.g. http://HEAD:8265"


def add_sweep_commands(sub) -> None:
    """Register the sweep, jobs, schedule and scheduler subcommands."""
    s = sub.add_parser(
        "sweep", help="run a sweep (a grid of pipelines) here, or submit it to a Ray cluster"
    )
    s.add_argument("sweep", help="sweep YAML file (pipelines/sweeps/*.yaml)")
    s.add_argument("--store", required=True, help=STORE_HELP + " (created if needed)")
    s.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (runs, which are complete, predicted bytes); start nothing",
    )
    s.add_argument(
        "--address",
        help=ADDRESS_HELP + ": submit the sweep there as a Ray Job instead of running it "
        "(the store must then be an absolute path every node sees, or s3://...)",
    )
    s.add_argument(
        "--working-dir",
        help="with --address: the directory uploaded with the job; it must hold the sweep, "
        "its base pipeline and the files they name by relative paths (default: the "
        "smallest such directory); files named by absolute paths are read where they are",
    )
    s.add_argument(
        "--resubmit",
        action="store_true",
        help="with --address: submit again although a job of this sweep ended (succeeded, "
        "failed or stopped); the new job finishes only what is missing",
    )
    s.set_defaults(func=cmd_sweep, uses_ray=lambda a: not a.dry_run and not a.address)

    j = sub.add_parser("jobs", help="status, logs or stop of a sweep submitted as a Ray Job")
    jsub = j.add_subparsers(required=True, metavar="ACTION", dest="action")
    for action, text in (
        ("status", "the job's status"),
        ("logs", "what the job printed"),
        ("stop", "stop the job"),
    ):
        p = jsub.add_parser(action, help=text)
        p.add_argument("submission_id", help="the id 'arrakis-ray sweep --address' printed")
        p.add_argument("--address", required=True, help=ADDRESS_HELP)
        if action == "logs":
            p.add_argument("--follow", action="store_true", help="keep printing until the job ends")
        p.set_defaults(func=cmd_jobs)
    p = jsub.add_parser("list", help="the cluster's arrakis-ray jobs, oldest first")
    p.add_argument("--address", required=True, help=ADDRESS_HELP)
    p.set_defaults(func=cmd_jobs)

    c = sub.add_parser("schedule", help="add, list or remove cron schedules of sweeps")
    csub = c.add_subparsers(required=True, metavar="ACTION", dest="action")
    a = csub.add_parser("add", help="record a schedule in the store")
    a.add_argument(
        "sweep",
        help="sweep YAML file; it, its base pipeline and the files they name by relative "
        "paths are copied into the store (at most 64 MiB): later changes need --replace",
    )
    a.add_argument("--cron", required=True, help="when: cron in UTC (5 fields), e.g. '0 3 * * *'")
    a.add_argument("--store", required=True, help=STORE_HELP + "; the sweep writes there too")
    a.add_argument("--name", help="the schedule's name (default: the sweep file's name)")
    a.add_argument(
        "--address", help=ADDRESS_HELP + " (default: the address the scheduler is given)"
    )
    a.add_argument(
        "--catch-up",
        choices=["latest", "all", "none"],
        default="latest",
        help="after downtime: submit only the latest missed firing (default), all of them "
        "(at most 100), or none",
    )
    a.add_argument("--replace", action="store_true", help="replace a schedule of that name")
    a.set_defaults(func=cmd_schedule)
    ls = csub.add_parser("list", help="the store's schedules and their next firings")
    ls.add_argument("--store", required=True, help=STORE_HELP)
    ls.set_defaults(func=cmd_schedule)
    rm = csub.add_parser("remove", help="remove a schedule (its history stays)")
    rm.add_argument("name", help="the schedule's name")
    rm.add_argument("--store", required=True, help=STORE_HELP)
    rm.set_defaults(func=cmd_schedule)

    r = sub.add_parser(
        "scheduler", help="submit the store's due sweeps as Ray Jobs (runs until stopped)"
    )
    r.add_argument("--store", required=True, help=STORE_HELP)
    r.add_argument("--address", help=ADDRESS_HELP + " (for schedules added without one)")
    r.add_argument(
        "--once",
        action="store_true",
        help="one pass, then exit (for system cron or a Kubernetes CronJob)",
    )
    r.add_argument(
        "--now",
        metavar="ISO",
        help="with --once: the pass's clock, e.g. 2025-01-02T03:00:30Z (backfills, tests)",
    )
    r.set_defaults(func=cmd_scheduler)


def cmd_sweep(args) -> int:
    """Plan the sweep; print the plan, run it here, or submit it to a cluster."""
    from arrakis_ray.sweeps.plan import plan_sweep
    from arrakis_ray.sweeps.spec import load_sweep

    sweep = load_sweep(args.sweep)
    if args.address:
        return _submit(args, sweep)
    if args.working_dir or args.resubmit:
        raise ConfigError("--working-dir and --resubmit apply with --address only")
    plan = plan_sweep(sweep, args.store)
    if args.dry_run:
        print(plan.describe())
        return 0
    from arrakis_ray.sweeps.execute import run_sweep

    print(
        f"sweep {sweep.name} ({sweep.sweep_id}): {len(plan.points)} points, "
        f"{len(plan.pending)} to run, {len(plan.harvests_to_run)} harvests -> {args.store}"
    )
    outcome = run_sweep(plan, args.store, echo=print)
    print(outcome.summary())
    if outcome.failed:
        return 1
    if sweep.report is not None:
        from arrakis_ray.sweeps.study import write_study_report

        print(f"report: {write_study_report(sweep, args.store)}")
    return 0


def _submit(args, sweep) -> int:
    from arrakis_ray.sweeps import jobs

    address = args.address
    from arrakis_ray.errors import DataError, ModelLoadError
    from arrakis_ray.sweeps.plan import plan_sweep

    store = jobs.canonical_store(args.store)
    try:
        plan = plan_sweep(sweep, store)  # its run ids are part of the submission id
    except (DataError, ModelLoadError, FileNotFoundError) as exc:
        plan = None  # inputs only the cluster sees: the job plans there
        print(f"not planned here ({exc}): the job plans the sweep on the cluster")
    submission_id = jobs.submission_id_for_sweep(sweep, store, plan)
    if args.dry_run:
        root = jobs.check_working_dir(sweep, args.working_dir or jobs.default_working_dir(sweep))
        if plan is not None:
            print(plan.describe())
        entrypoint = jobs.sweep_entrypoint(sweep, store, root)
        print(f"would submit {submission_id} to {address}: {entrypoint}")
        print(f"working dir: {root}")
        return 0
    if args.resubmit:
        submission_id = jobs.resubmission_id(submission_id, address)
    done = jobs.submit_sweep(sweep, store, address, args.working_dir, submission_id=submission_id)
    if done.status == "submitted":
        print(f"submitted {done.submission_id} to {address}")
        print(f"  runs:        {done.entrypoint}")
        print(f"  working dir: {done.working_dir}")
    else:
        print(f"already submitted: {done.submission_id} is {done.job_status} on {address}")
        if done.job_status in ("SUCCEEDED", "FAILED", "STOPPED"):
            print("  to run it again (only what is missing): add --resubmit")
    print(f"follow: arrakis-ray jobs logs {done.submission_id} --address {address} --follow")
    print(f"status: arrakis-ray jobs status {done.submission_id} --address {address}")
    return 0


def cmd_jobs(args) -> int:
    """jobs status | logs | stop | list."""
    from arrakis_ray.sweeps import jobs

    if args.action == "list":
        found = jobs.list_jobs(args.address)
        if not found:
            print(f"no arrakis-ray jobs on {args.address}")
        for job in found:
            what = job.metadata.get("arrakis_schedule") or job.metadata.get("arrakis_sweep", "")
            fire = job.metadata.get("arrakis_fire_time")
            print(
                f"{job.submission_id}  {job.status:<9}  {_when(job.start_time)}  {what}"
                + (f" (firing {fire})" if fire else "")
            )
        return 0
    if args.action == "status":
        job = jobs.job_state(args.submission_id, args.address)
        print(f"{job.submission_id}: {job.status}" + (f": {job.message}" if job.message else ""))
        print(f"  started {_when(job.start_time)}, ended {_when(job.end_time)}")
        print(f"  runs: {job.entrypoint}")
        return 0 if job.status != "FAILED" else 1
    if args.action == "logs":
        if args.follow:
            jobs.follow_logs(args.submission_id, args.address, lambda s: print(s, end=""))
        else:
            print(jobs.job_logs(args.submission_id, args.address), end="")
        return 0
    stopped = jobs.stop_job(args.submission_id, args.address)
    if stopped:
        print(f"{args.submission_id}: stop requested")
    else:
        state = jobs.job_state(args.submission_id, args.address)
        print(f"{args.submission_id}: not running ({state.status})")
    return 0


def cmd_schedule(args) -> int:
    """schedule add | list | remove."""
    from arrakis_ray.sweeps import schedules

    if args.action == "add":
        record = schedules.add_schedule(
            args.sweep, args.cron, args.store, name=args.name, address=args.address,
            catch_up=args.catch_up, replace=args.replace,
        )  # fmt: skip
        now = datetime.now(UTC)
        print(f"schedule {record.name}: {record.cron!r} (UTC) -> {record.sweep}")
        print(f"  sweep {record.sweep_id}; its files are copied into the store")
        print(f"  store {record.store}; catch-up {record.catch_up}")
        print(f"  next firing: {schedules.next_firing(record, now).isoformat()}")
        where = f" --address {record.address}" if record.address else " --address http://HEAD:8265"
        print(f"  submitted by: arrakis-ray scheduler --store {record.store}{where}")
        return 0
    from arrakis_ray.sweeps.records import read_firings, read_schedules, remove_schedule

    if args.action == "remove":
        remove_schedule(args.store, args.name)
        print(f"schedule {args.name} removed (its firings stay in schedule_firings)")
        return 0
    found = read_schedules(args.store)
    if not found:
        print(f"no schedules in {args.store}")
    now = datetime.now(UTC)
    for record in found:
        events = read_firings(args.store, record.name)
        last = f"{events[-1].fire_time} {events[-1].status}" if events else "never"
        print(
            f"{record.name}: {record.cron!r} (UTC), catch-up {record.catch_up}, "
            f"next {schedules.next_firing(record, now).isoformat()}, last {last}"
        )
        print(f"  sweep {record.sweep}" + (f", address {record.address}" if record.address else ""))
    return 0


def cmd_scheduler(args) -> int:
    """The scheduler: one pass (--once) or a loop until interrupted."""
    from arrakis_ray.sweeps.schedules import run_scheduler

    now = None
    if args.now:
        try:
            now = datetime.fromisoformat(args.now)
        except ValueError:
            raise ConfigError(f"--now {args.now!r}: not an ISO 8601 time") from None
    if not args.once:
        print(f"scheduler: {args.store}, submitting to {args.address or 'each schedule address'}")
    try:
        events = run_scheduler(
            args.store,
            args.address,
            once=args.once,
            now=now,
            echo=_print_firing if args.once else None,  # the loop logs each firing, timed
        )
    except KeyboardInterrupt:
        print("scheduler stopped")
        return 0
    if args.once and not events:
        print("no firing due")
    return 1 if any(e.status == "failed" for e in events) else 0


def _print_firing(event) -> None:
    sid = f" {event.submission_id}" if event.submission_id and event.status != "skipped" else ""
    error = f": {event.error}" if event.error else ""
    print(f"{event.schedule} {event.fire_time}: {event.status}{sid}{error}", flush=True)


def _when(millis: int | None) -> str:
    if not millis:
        return "-"
    return datetime.fromtimestamp(millis / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
