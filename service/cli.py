"""The ``onnx-prune`` command line: ``prune``, ``inspect``, ``metrics``, and the jobs of a server:
``submit``, ``watch``, ``status``, ``cancel`` and ``fetch`` (docs/jobs.md).

Every failure, local or remote, ends in :func:`main`, which prints one line
(``onnx-prune: error: ...``) and exits with the code the one table in
:mod:`service.errors` gives its class:

    0    done (also when nothing could be pruned within the tolerance)
    1    internal error: a bug of ours (traceback with ``--debug``)
    2    bad input: model, eval set, options, output paths, too large for the
         server, refused bearer token
    3    nothing pruned, with ``--fail-unchanged``
    4    the server cannot be reached, or is shutting down: retry (later, or elsewhere)
    5    the server is busy: retry later
    6    over a time limit (the server's, or the job's)
    130  interrupted; nothing was written
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import traceback
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from google.protobuf import json_format

import pruner
from pruner import (
    AcceptanceRule,
    Allocation,
    Criterion,
    MetricKind,
    Mode,
    Objective,
    ProgressEvent,
    PruneOptions,
    Recovery,
    Tolerance,
)
from service import convert, errors, views
from service._gen.onnxpruner.v1 import pruner_pb2 as pb
from service.client import Connection, check_target, raise_for_job
from service.errors import Exit

DEFAULTS = PruneOptions()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # the one line that names the problem; the full usage is a screenful now
        self.exit(Exit.BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnx-prune", description="Prune ONNX models within an accuracy tolerance.")
    parser.add_argument("--version", action="version", version=f"onnx-prune {pruner._prune.tool_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prune", help="prune a model to the smallest one within tolerance")
    p.add_argument("model", help="input .onnx model")
    p.add_argument(
        "--eval",
        "--eval-set",
        required=True,
        dest="eval_set",
        help=".npz eval set: one array per input, optional 'labels'",
    )
    p.add_argument("-o", "--out", required=True, help="where to write the pruned .onnx")
    p.add_argument("--report", help="where to write the JSON report")
    p.add_argument("--plot", metavar="PNG", help="write the metric-vs-size plot of every candidate (needs [plot])")
    p.add_argument("--html", metavar="HTML", help="write a self-contained HTML report (needs [plot])")
    _option_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--fail-unchanged",
        action="store_true",
        help="exit 3 when no candidate passed the tolerance (for pipelines; the files are still written)",
    )
    _remote_arguments(p)

    i = sub.add_parser("inspect", help="list the prunable layers of a model")
    i.add_argument("model")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--include", action="append", default=[], metavar="GLOB")
    i.add_argument("--exclude", action="append", default=[], metavar="GLOB")
    _remote_arguments(i)

    j = sub.add_parser("submit", help="store a pruning job on a server; prints its id (docs/jobs.md)")
    j.add_argument("model", help="input .onnx model")
    j.add_argument("--eval", "--eval-set", required=True, dest="eval_set", help=".npz eval set")
    _option_arguments(j)
    j.add_argument("--idempotency-key", metavar="KEY", help="submitting again with the same key runs the job once")
    _remote_arguments(j, required=True)

    w = sub.add_parser("watch", help="stream a job's progress until it ends; exits as prune would")
    w.add_argument("job", help="the job's id")
    w.add_argument("--from-event", type=int, default=0, help="the first event to show (default 0)")
    w.add_argument("--quiet", action="store_true", help="no progress lines")
    w.add_argument("--fail-unchanged", action="store_true", help="exit 3 when no candidate passed the tolerance")
    _remote_arguments(w, required=True)

    st = sub.add_parser("status", help="a job's state, report and error")
    st.add_argument("job", help="the job's id")
    st.add_argument("--json", action="store_true", help="machine-readable output (the Job message as JSON)")
    _remote_arguments(st, required=True)

    c = sub.add_parser("cancel", help="cancel a job")
    c.add_argument("job", help="the job's id")
    _remote_arguments(c, required=True)

    f = sub.add_parser("fetch", help="download a succeeded job's model (resumes a partial download)")
    f.add_argument("job", help="the job's id")
    f.add_argument("-o", "--out", required=True, help="where to write the pruned .onnx")
    f.add_argument("--report", help="where to write the JSON report")
    _remote_arguments(f, required=True)

    m = sub.add_parser("metrics", help="list the built-in metrics and the installed metric plugins")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    _remote_arguments(m)
    return parser


def _option_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a pruning run, shared by ``prune`` and ``submit``."""
    p.add_argument(
        "--metric",
        metavar="NAME|MODULE:FUNCTION",
        help="a built-in metric (default accuracy; 'onnx-prune metrics' lists them), or your own scoring "
        "function, imported and run here (never sent to a server)",
    )
    p.add_argument(
        "--metric-plugin",
        metavar="NAME",
        help="an installed metric plugin (entry point in onnx_pruner.metrics): here, or on the --server",
    )
    p.add_argument("--top-k", type=int, default=DEFAULTS.top_k, help="k of the topk metric (default %(default)s)")
    p.add_argument(
        "--threshold",
        type=float,
        default=DEFAULTS.threshold,
        help="dice, iou: an output above it is foreground (default %(default)s; 0 for logits)",
    )
    p.add_argument("--column", type=int, help="metrics of one score read output[..., COLUMN] (default: all)")
    p.add_argument("--pad-id", type=int, help="sequence metrics, accuracy, agreement: ignore this target id")
    p.add_argument("--ctc-blank", type=int, help="sequence metrics: CTC-decode, dropping this blank id")
    p.add_argument(
        "--sequence-mask",
        metavar="ARRAY",
        help="sequence metrics, accuracy, agreement: eval set array [samples, positions]; 0 ignores a position",
    )
    p.add_argument(
        "--output-sample-axis",
        type=int,
        default=DEFAULTS.output_sample_axis,
        help="axis of the measured output holding the samples (default %(default)s; 1 for [time, batch, ...])",
    )
    p.add_argument(
        "--input-sample-axis",
        action="append",
        default=[],
        metavar="NAME=AXIS",
        help="a model input whose samples are on AXIS (e.g. h0=1); the eval set stores samples first",
    )
    p.add_argument("--output", help="model output the metric reads (default: the first)")
    p.add_argument(
        "--tolerance", default=str(DEFAULTS.tolerance), help="allowed metric loss: 0.01 (absolute) or 1%% (relative)"
    )
    p.add_argument(
        "--mode",
        choices=[m.value for m in Mode],
        default=DEFAULTS.mode.value,
        help="zero weights (shapes kept), remove channels (smaller, faster model) or nm (N:M per layer)",
    )
    p.add_argument("--nm", default="2:4", metavar="N:M", help="N:M mode: keep N of every M weights (default 2:4)")
    p.add_argument(
        "--objective",
        choices=[o.value for o in Objective],
        help="what smallest means (default: params in zero mode, bytes in remove mode)",
    )
    p.add_argument(
        "--channel-multiple",
        type=int,
        help="remove mode: keep channel counts a multiple of this (default: 8 where a layer has a multiple "
        "of 8, as onnxruntime's fast conv kernels need, else 1)",
    )
    p.add_argument(
        "--criterion",
        choices=[c.value for c in Criterion],
        default=DEFAULTS.criterion.value,
        help="how weights are scored (docs/criteria.md); gradient and fisher need the gradient extra: "
        "pip install 'onnx-pruner[gradient]'",
    )
    p.add_argument(
        "--sensitivity-from",
        metavar="REPORT",
        help="allocation sensitivity: reuse the profile of an earlier run's JSON report",
    )
    p.add_argument(
        "--recover",
        choices=[r.value for r in Recovery],
        default=DEFAULTS.recover.value,
        help="win accuracy back from calibration data: auto (default: lsq for every layer whose fit is cheap, "
        "bias correction for the others), bias correction, lsq (least-squares refit of the kept weights, then "
        "bias correction), sequential (lsq layer by layer on the inputs the pruned model produces: best at "
        "high sparsity; each candidate walks the calibration samples through the model), or none",
    )
    p.add_argument(
        "--calibration-samples",
        type=int,
        default=DEFAULTS.calibration_samples,
        help="samples of the search split used for calibration (default %(default)s)",
    )
    p.add_argument("--allocation", choices=[a.value for a in Allocation], default=DEFAULTS.allocation.value)
    p.add_argument("--max-evaluations", type=int, default=DEFAULTS.max_evaluations)
    p.add_argument("--max-seconds", type=float, help="wall-clock budget of the search")
    p.add_argument(
        "--search-width",
        type=int,
        default=DEFAULTS.search_width,
        help="levels judged per round of the global-level bisection, 1-16 (default %(default)s: a bisection); "
        "k > 1 judges k levels at once where the executor has idle workers, each one counting against "
        "--max-evaluations (docs/search.md)",
    )
    p.add_argument(
        "--target-sparsity", type=float, help="skip the search: try only this sparsity (kept if within tolerance)"
    )
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--holdout", type=float, default=DEFAULTS.holdout_fraction, help="held-out share of the eval set")
    p.add_argument(
        "--acceptance",
        choices=[a.value for a in AcceptanceRule],
        default=DEFAULTS.acceptance.value,
        help="held-out acceptance rule: exact (measured drop within tolerance), interval (refused only when the "
        "held-out split shows the drop exceeds the tolerance at --confidence) or bound (the interval's upper end "
        "within tolerance; needs a large held-out split) (default %(default)s; docs/acceptance.md)",
    )
    p.add_argument(
        "--confidence",
        type=float,
        default=DEFAULTS.confidence,
        help="level of the held-out drop's confidence interval, alpha = 1 - confidence (default %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    p.add_argument("--threads", type=int, default=DEFAULTS.threads, help="onnxruntime intra-op threads (0: auto)")
    p.add_argument(
        "--executor",
        choices=[e.value for e in pruner.Executor],
        default=DEFAULTS.executor.value,
        help="where a local run evaluates candidates: here, or sharded over a Ray cluster's workers "
        "(needs the ray extra; the same model and report) (default %(default)s; docs/ray.md)",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="--executor ray: the cluster (HOST:PORT of its head, or ray://...); default: a local Ray for the run",
    )
    p.add_argument(
        "--executor-workers",
        type=int,
        default=DEFAULTS.executor_workers,
        metavar="N",
        help="--executor ray: Ray workers, one CPU each, placed together (default: one per CPU of the cluster)",
    )
    p.add_argument("--layer-cap", type=float, default=DEFAULTS.layer_cap, help="max sparsity of any layer")
    p.add_argument("--include", action="append", default=[], metavar="GLOB", help="prune only matching layers")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="never prune matching layers")
    p.add_argument("--sparse-initializers", action="store_true", help="store zeroed weights as sparse_initializer")


def _remote_arguments(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    p.add_argument("--server", metavar="HOST:PORT", required=required, help="an onnx-pruner gRPC server")
    p.add_argument("--token-file", help="file with the server's bearer token (default: $ONNX_PRUNER_TOKEN if set)")
    p.add_argument("--tls-ca", metavar="PEM", help="CA certificate of the server; connects with TLS")
    p.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")


def _connection(args: argparse.Namespace) -> Connection:
    token = os.environ.get("ONNX_PRUNER_TOKEN")
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            raise pruner.InvalidConfigError(f"cannot read token file {args.token_file!r}: {e.strerror or e}") from e
    if args.tls_ca and not Path(args.tls_ca).is_file():
        raise pruner.InvalidConfigError(f"TLS CA file {args.tls_ca!r} does not exist")
    return Connection(args.server, token=token or None, tls_ca=args.tls_ca, tls=args.tls)


def _options(args: argparse.Namespace) -> PruneOptions:
    if args.server and args.executor != pruner.Executor.LOCAL.value:
        raise pruner.InvalidConfigError(
            "--executor ray is for local runs; with --server, the server's own --executor decides where its jobs run"
        )
    return PruneOptions(
        executor=pruner.Executor(args.executor),
        ray_address=args.ray_address,
        executor_workers=args.executor_workers,
        mode=Mode(args.mode),
        nm=_nm(args.nm),
        objective=Objective(args.objective) if args.objective else None,
        channel_multiple=args.channel_multiple,
        criterion=Criterion(args.criterion),
        recover=Recovery(args.recover),
        calibration_samples=args.calibration_samples,
        allocation=Allocation(args.allocation),
        metric=_metric(args),
        top_k=args.top_k,
        threshold=args.threshold,
        column=args.column,
        pad_id=args.pad_id,
        ctc_blank=args.ctc_blank,
        sequence_mask=args.sequence_mask,
        output_sample_axis=args.output_sample_axis,
        input_sample_axes=_sample_axes(args.input_sample_axis),
        output=args.output,
        tolerance=Tolerance.parse(args.tolerance),
        max_evaluations=args.max_evaluations,
        max_seconds=args.max_seconds,
        search_width=args.search_width,
        target_sparsity=args.target_sparsity,
        sensitivity=_profile(args.sensitivity_from),
        seed=args.seed,
        holdout_fraction=args.holdout,
        acceptance=AcceptanceRule(args.acceptance),
        confidence=args.confidence,
        batch_size=args.batch_size,
        threads=args.threads,
        layer_cap=args.layer_cap,
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        sparse_initializers=args.sparse_initializers,
    )


def _metric(args: argparse.Namespace) -> MetricKind | pruner.CustomMetric:
    """The metric of ``--metric`` or ``--metric-plugin``; nothing is imported for a server."""
    if args.metric_plugin is not None:
        if args.metric is not None:
            raise pruner.InvalidConfigError("give --metric or --metric-plugin, not both")
        if args.server:
            return convert.server_metric(args.metric_plugin)  # the server loads its own installed plugin
        return pruner.plugin_metric(args.metric_plugin)
    spec = args.metric or DEFAULTS.metric_name
    if spec in {m.value for m in MetricKind}:
        return MetricKind(spec)
    if ":" not in spec:
        choices = ", ".join(m.value for m in MetricKind)
        raise pruner.InvalidConfigError(
            f"--metric {spec!r} is neither a built-in metric ({choices}) nor module:function"
        )
    if args.server:
        raise pruner.InvalidConfigError(
            f"--metric {spec!r} is your own code and runs locally only: a server never runs code a client sends; "
            "install it on the server as a metric plugin and choose it with --metric-plugin NAME"
        )
    return pruner.load_metric(spec)


def _sample_axes(pairs: list[str]) -> dict[str, int] | None:
    axes: dict[str, int] = {}
    for pair in pairs:
        name, sep, axis = pair.rpartition("=")
        if not sep or not name or not axis.strip().lstrip("-").isdigit():
            raise pruner.InvalidConfigError(f"--input-sample-axis must look like NAME=AXIS (e.g. h0=1), got {pair!r}")
        if name in axes:
            raise pruner.InvalidConfigError(f"--input-sample-axis names input {name!r} twice")
        axes[name] = int(axis)
    return axes or None


def _profile(path: str | None) -> dict[str, list[list[float]]] | None:
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise pruner.InvalidConfigError(f"cannot read a report from {path!r}: {e}") from e
    profile = data.get("sensitivity") if isinstance(data, dict) else None
    if not profile:
        raise pruner.InvalidConfigError(f"{path!r} holds no sensitivity profile (run with --allocation sensitivity)")
    return profile


def _nm(text: str) -> tuple[int, int]:
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise pruner.InvalidConfigError(f"--nm must look like 2:4, got {text!r}")
    return int(parts[0]), int(parts[1])


class _Progress:
    """tqdm bar over candidate evaluations, fed by the library's progress events."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="pruning", unit="eval", disable=not enabled, file=sys.stderr, leave=False)
        self.best = "-"

    def __call__(self, event: ProgressEvent) -> None:
        kind = event.kind
        if kind is pruner.EventKind.CANDIDATE:
            self.bar.update(1)
        elif kind is pruner.EventKind.NEW_BEST and event.sparsity is not None:
            self.best = f"{event.sparsity:.1%}"
        self.bar.set_postfix_str(f"best {self.best} | {event.message}", refresh=True)

    def close(self) -> None:
        self.bar.close()


def _summary(report: pruner.Report) -> str:
    def metric(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    rows = [
        ("status", report.status),
        (f"{report.metric} (search split)", f"{metric(report.baseline.search)} -> {metric(report.final.search)}"),
        (f"{report.metric} (held-out split)", f"{metric(report.baseline.holdout)} -> {metric(report.final.holdout)}"),
        ("allowed loss", f"{report.allowed_loss:.4g}"),
        ("held-out drop", views.drop_text(report.drop)),
        ("prunable params", f"{report.prunable_params:,} of {report.total_params:,}"),
        ("nonzero prunable params", f"{report.nonzero_before:,} -> {report.nonzero_after:,}"),
        ("sparsity", f"{report.sparsity:.1%}"),
    ]
    if report.options.get("mode") == "remove":
        rows[-3:] = [
            ("params of prunable layers", f"{report.prunable_params:,} of {report.total_params:,}"),
            ("params left", f"{report.nonzero_before:,} -> {report.nonzero_after:,} ({report.sparsity:.1%} removed)"),
        ]
    rows += [
        ("file bytes", f"{report.bytes_before:,} -> {report.bytes_after:,}"),
        ("evaluations", f"{report.evaluations} (+{report.confirmations} held-out, {report.probes} probes)"),
        ("wall time", views.wall_time(report)),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"note: {n}" for n in report.notes]
    if report.layers:
        lines.append("")
        name_width = max(12, *(len(la.name) for la in report.layers))
        lines.append(f"{'layer':<{name_width}}  {'op':<14} {'params':>10} {'sparsity':>9}")
        if any(la.channels_before is not None for la in report.layers):
            lines[-1] = f"{'layer':<{name_width}}  {'params':>10} {'channels':>12} {'removed':>8}"
            for la in report.layers:
                channels = f"{la.channels_before} -> {la.channels_after}"
                lines.append(f"{la.name:<{name_width}}  {la.params:>10,} {channels:>12} {la.sparsity:>8.1%}")
        else:
            for la in report.layers:
                lines.append(f"{la.name:<{name_width}}  {la.op_type:<14} {la.params:>10,} {la.sparsity:>9.1%}")
    return "\n".join(lines)


def _check_outputs(args: argparse.Namespace) -> None:
    """Before any work: every output can be written, and none is another output or an input."""
    taken: list[tuple[str, str]] = [(args.model, "the input model"), (args.eval_set, "--eval")]
    for path, what in (
        (args.sensitivity_from, "--sensitivity-from"),
        (args.token_file, "--token-file"),
        (args.tls_ca, "--tls-ca"),
    ):
        if path:
            taken.append((path, what))
    for path, what in ((args.out, "-o/--out"), (args.report, "--report"), (args.plot, "--plot"), (args.html, "--html")):
        if path:
            pruner.check_output_path(path, what, others=taken)
            taken.append((path, what))


def _cmd_prune(args: argparse.Namespace) -> int:
    _check_outputs(args)
    options = _options(args)
    if args.plot or args.html:
        views.require_matplotlib()
    progress = _Progress(options.max_evaluations, enabled=not args.quiet and sys.stderr.isatty())
    try:
        if args.server:
            with _connection(args) as connection:
                # a durable job: survives a dropped connection or a server restart
                result = connection.prune_job(args.model, args.eval_set, options, on_progress=progress)
        else:
            result = pruner.prune(args.model, args.eval_set, options, on_progress=progress)
    finally:
        progress.close()
    extra = []
    if args.plot:
        extra.append((args.plot, views.trade_off_png(result.report)))
    if args.html:
        extra.append((args.html, views.html_page(result.report, Path(args.model).name).encode()))
    result.save(args.out, args.report, extra=extra)
    print(_summary(result.report))
    if args.fail_unchanged and result.report.status == "unchanged":
        print("onnx-prune: nothing could be pruned within the tolerance", file=sys.stderr)
        return Exit.UNCHANGED
    return Exit.OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    data: dict[str, Any]
    if args.server:
        with _connection(args) as connection:
            data = connection.inspect(args.model, include=tuple(args.include), exclude=tuple(args.exclude))
    else:
        inspection = pruner.inspect(args.model, include=tuple(args.include), exclude=tuple(args.exclude))
        data = inspection.to_dict()
    if args.json:
        print(json.dumps(data, indent=2))
        return Exit.OK
    layers = data["layers"]
    name_width = max([5, *(len(la["name"]) for la in layers)])
    print(f"{'layer':<{name_width}}  {'op':<14} {'shape':<20} {'params':>10} {'share':>7}")
    for la in layers:
        shape = "x".join(map(str, la["shape"]))
        print(f"{la['name']:<{name_width}}  {la['op_type']:<14} {shape:<20} {la['params']:>10,} {la['share']:>7.1%}")
    print(
        f"\n{len(layers)} prunable layer(s), {data['prunable_params']:,} of {data['total_params']:,} params "
        f"({data['prunable_params'] / max(data['total_params'], 1):.1%})"
    )
    for s in data["skipped"]:
        print(f"skipped {s['name']} ({s['op_type']}): {s['reason']}")
    return Exit.OK


def _cmd_submit(args: argparse.Namespace) -> int:
    options = _options(args)
    # a submit cut off (a server restart, a dropped connection) is sent again with the same key:
    # the user's, or one of ours, so the job is stored once either way
    key = args.idempotency_key or uuid.uuid4().hex
    with _connection(args) as connection:
        job_id, created, attempts = connection.submit_retrying(args.model, args.eval_set, options, idempotency_key=key)
    if not created and attempts == 1:
        print(f"onnx-prune: the idempotency key names job {job_id}, submitted before", file=sys.stderr)
    print(job_id)
    return Exit.OK


_STATE_NAMES = {value.number: value.name.removeprefix("JOB_STATE_").lower() for value in pb.JobState.DESCRIPTOR.values}


def _job_lines(job: pb.Job) -> str:
    rows = [("job", job.job_id), ("state", _STATE_NAMES.get(job.state, str(job.state)))]
    if job.status:
        rows.append(("status", job.status))
    if job.error_code:
        rows.append(("error", f"{job.error_code}: {job.error_message}"))
    if job.result_sha256:
        rows.append(("result", f"{job.result_size:,} bytes, sha256 {job.result_sha256}"))
    rows += [("attempts", str(job.attempts)), ("events", str(job.events))]
    if job.cancel_requested and job.state == pb.JOB_STATE_RUNNING:
        rows.append(("cancel", "requested"))
    if job.idempotency_key:
        rows.append(("idempotency key", job.idempotency_key))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _cmd_watch(args: argparse.Namespace) -> int:
    def show(event: ProgressEvent) -> None:
        if not args.quiet:
            print(f"[{event.evaluation}/{event.max_evaluations}] {event.message}", file=sys.stderr, flush=True)

    with _connection(args) as connection:
        job = connection.follow(args.job, args.from_event, on_progress=show)
    raise_for_job(job)
    print(_summary(pruner.Report.from_json(job.report_json)))
    if args.fail_unchanged and job.status == "unchanged":
        print("onnx-prune: nothing could be pruned within the tolerance", file=sys.stderr)
        return Exit.UNCHANGED
    return Exit.OK


def _cmd_status(args: argparse.Namespace) -> int:
    with _connection(args) as connection:
        job = connection.get_job(args.job)
    if args.json:
        print(json.dumps(json_format.MessageToDict(job, preserving_proto_field_name=True), indent=2))
    else:
        print(_job_lines(job))
    return Exit.OK


def _cmd_cancel(args: argparse.Namespace) -> int:
    with _connection(args) as connection:
        job = connection.cancel_job(args.job)
    print(_job_lines(job))
    return Exit.OK


def _cmd_fetch(args: argparse.Namespace) -> int:
    taken: list[tuple[str, str]] = []
    for path, what in ((args.out, "-o/--out"), (args.report, "--report")):
        if path:
            pruner.check_output_path(path, what, others=taken)
            taken.append((path, what))
    out = Path(args.out)
    part = out.with_name(out.name + ".part")
    with _connection(args) as connection:
        job = connection.get_job(args.job)
        if job.state != pb.JOB_STATE_SUCCEEDED:
            state = _STATE_NAMES.get(job.state, str(job.state))
            why = f" ({job.error_code}: {job.error_message})" if job.error_code else ""
            raise errors.JobStateError(f"the job {job.job_id} is {state}, not succeeded{why}: it has no result")
        offset = part.stat().st_size if part.exists() else 0
        if offset > job.result_size:  # not a part of this result
            offset = 0
        with open(part, "ab" if offset else "wb") as handle:
            connection.fetch(args.job, handle, offset)
    digest = hashlib.sha256()
    with open(part, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    if digest.hexdigest() != job.result_sha256 or part.stat().st_size != job.result_size:
        part.unlink()
        raise pruner.InternalError(f"the downloaded result of job {args.job} does not match its sha256; fetch again")
    part.replace(out)
    if args.report:
        Path(args.report).write_text(job.report_json)
    print(f"{out}: {job.result_size:,} bytes, sha256 {job.result_sha256}")
    return Exit.OK


def _cmd_metrics(args: argparse.Namespace) -> int:
    if args.server:
        with _connection(args) as connection:
            catalogue = connection.list_metrics()
        where = f"on the server at {args.server}"
    else:
        catalogue = convert.metrics_to_proto()
        where = "here"
    if args.json:
        print(
            json.dumps(
                json_format.MessageToDict(
                    catalogue, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
                ),
                indent=2,
            )
        )
        return Exit.OK
    width = max(len(m.name) for m in [*catalogue.builtin, *catalogue.plugins])
    lines = ["built-in metrics (--metric NAME):"]
    for info in catalogue.builtin:
        lines.append(f"  {info.name:<{width}}  {_better(info)}  {info.description}")
    lines += ["", f"metric plugins installed {where} (--metric-plugin NAME):"]
    for info in catalogue.plugins:
        if info.error:
            lines.append(f"  {info.name:<{width}}  unusable: {info.error}")
        else:
            about = f"{info.description} ({info.source})" if info.description else info.source
            lines.append(f"  {info.name:<{width}}  {_better(info)}  {about}")
    if not catalogue.plugins:
        lines.append("  none")
    print("\n".join(lines))
    return Exit.OK


def _better(info: Any) -> str:
    return "higher" if info.higher_is_better else "lower "


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``onnx-prune`` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.server is not None:
            check_target(args.server, "--server")
        if args.command == "prune":
            return _cmd_prune(args)
        commands = {
            "metrics": _cmd_metrics,
            "submit": _cmd_submit,
            "watch": _cmd_watch,
            "status": _cmd_status,
            "cancel": _cmd_cancel,
            "fetch": _cmd_fetch,
            "inspect": _cmd_inspect,
        }
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("onnx-prune: interrupted; nothing was written", file=sys.stderr)
        return Exit.INTERRUPTED
    except Exception as e:
        print(_failure_line(e, debug=args.debug), file=sys.stderr)
        return errors.exit_code(e)


def _failure_line(error: Exception, *, debug: bool) -> str:
    """The one line that says what went wrong, by the error's row of the table (after its traceback with --debug)."""
    code = errors.exit_code(error)
    if code == Exit.INTERNAL:
        text = str(error) if isinstance(error, pruner.PrunerError) else f"{type(error).__name__}: {error}"
        if debug:
            traceback.print_exception(error, file=sys.stderr)
            return f"onnx-prune: internal error: {text}"
        return f"onnx-prune: internal error: {text} (rerun with --debug for details)"
    if isinstance(error, errors.ServerBusyError):
        return f"onnx-prune: error: the server is busy; retry in {error.retry_after:g} s ({error})"
    if code == Exit.INTERRUPTED:
        return f"onnx-prune: error: {error}; nothing was written"
    return f"onnx-prune: error: {error}"


if __name__ == "__main__":
    sys.exit(main())
