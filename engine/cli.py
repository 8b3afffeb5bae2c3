"""The ``headrace`` command. Parses arguments, builds config, calls library functions, and
maps exception types to exit codes in one place. ``python -m engine`` runs the same code.

Every summarising command prints, with ``--json``, one JSON object as its last line of
stdout; human-readable progress goes to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable

import orjson

from engine.config import HeadraceConfig, load_config, replace_in
from engine.errors import HEADRACE_ERRORS, ConfigError, exit_code_of
from engine.logs import LogFormat, configure_logging

__all__ = ["main", "build_parser"]

log = logging.getLogger("headrace")


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS).decode() + "\n")
    else:
        width = max((len(k) for k in result), default=0)
        for key, value in result.items():
            if isinstance(value, float):
                value = f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
            elif isinstance(value, (dict, list)):
                value = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
            sys.stdout.write(f"{key:<{width}}  {value}\n")
    sys.stdout.flush()


def _config(args) -> HeadraceConfig:
    cfg = load_config(args.config)
    listen = getattr(args, "metrics_listen", None)
    if listen is not None:  # --metrics-listen overrides [metrics] listen
        try:
            cfg = replace_in(cfg, "metrics", listen=listen)
        except ValueError as exc:
            raise ConfigError(f"--metrics-listen: {exc}") from None
    return cfg


def _require_cache(cfg: HeadraceConfig) -> None:
    import os

    from engine.errors import CacheError

    if not os.path.isdir(cfg.cache.path):
        raise CacheError(f"no cache at {cfg.cache.path!r} (nothing ingested yet? run serve or backfill first)")


def cmd_broker(args) -> None:
    from streams.broker import run_forever

    run_forever(port=args.port)


def cmd_serve(args) -> dict:
    from engine.serve import serve

    return serve(_config(args), train=not args.no_train, max_seconds=args.max_seconds,
                 status_path=args.status_file)


def cmd_backfill(args) -> dict:
    from engine.backfill import KafkaRange, backfill, parse_time_ms

    cfg = _config(args)
    sources = args.sources
    if len(sources) == 1 and sources[0].startswith("kafka:"):
        rng = KafkaRange(
            topic=sources[0][len("kafka:"):],
            start_offset=args.start_offset, end_offset=args.end_offset,
            start_time_ms=parse_time_ms(args.start_time) if args.start_time else None,
            end_time_ms=parse_time_ms(args.end_time) if args.end_time else None,
        )
        return backfill(cfg, kafka_range=rng)
    if any(s.startswith("kafka:") for s in sources):
        raise ConfigError("backfill --from: a kafka:TOPIC range cannot be mixed with files")
    return backfill(cfg, paths=sources)


def cmd_train(args) -> dict:
    from engine.progress import ProgressLine
    from engine.train import train

    line = ProgressLine()

    def show(s: dict) -> None:
        auc = s.get("auc")
        fresh = s.get("freshness_p50_s")
        line.update(f"train: {s.get('trained_samples', 0):,} samples"
                    + (f" | AUC {auc:.3f} | logloss {s.get('logloss', float('nan')):.4f}" if auc is not None else "")
                    + (f" | fresh p50 {fresh:.1f}s p99 {s['freshness_p99_s']:.1f}s" if fresh is not None else ""),
                    fields={k: s.get(k) for k in _TRAIN_PROGRESS_FIELDS})

    result = train(_config(args), follow=args.follow, on_progress=show)
    line.close()
    return result


#: The numbers of a progress report a JSON progress log line carries.
_TRAIN_PROGRESS_FIELDS = ("trained_samples", "total_trained_samples", "samples_per_s", "auc", "logloss",
                          "window_auc", "freshness_p50_s", "freshness_p99_s", "data_wait_fraction")


def cmd_report(args) -> dict:
    from engine.report import report

    return report(_config(args), config_path=args.config, out_dir=args.out)


def cmd_feed(args) -> dict:
    from engine.feed import feed

    def ready(info: dict) -> None:  # the address first (port 0 picks one), the summary at exit
        _emit(info, args.json)

    result = feed(_config(args), listen=args.listen, token_env=args.token_env, tls_cert=args.tls_cert,
                  tls_key=args.tls_key, on_ready=ready)
    if result["abandoned_streams"]:
        # Flight's shutdown still waits on a stream whose reader stopped reading; a normal
        # exit would wait with it. The feed holds no state of its own to flush.
        import os

        _emit(result, args.json)
        sys.stderr.flush()
        os._exit(0)
    return result


def cmd_export(args) -> dict:
    from engine.export import export_package

    return export_package(_config(args), args.out, since=args.since, dtype=args.dtype,
                          checkpoint=args.checkpoint, program=False if args.no_program else None)


def cmd_score(args) -> dict:
    from engine.score import score

    return score(args.model, args.sources, cfg=_config(args) if args.config else None, out=args.out,
                 labeled=not args.no_labels)


def cmd_produce(args) -> dict:
    from streams.producer import produce_file

    cfg = _config(args)
    topic = args.topic or cfg.source.topics[0]
    if args.partitions is not None and not args.create_topic:
        raise ConfigError("produce --partitions N needs --create-topic (an existing topic keeps its partitions)")
    if args.create_topic:
        from streams.admin import ensure_topic

        ensure_topic(cfg.source.bootstrap, topic, args.partitions, client_options=cfg.source.client_options)
    count = produce_file(cfg.source.bootstrap, topic, args.path, rate_events_per_s=args.rate,
                         client=cfg.source.client, client_options=cfg.source.client_options,
                         csv_header=cfg.schema.csv_header)
    return {"produced": count, "topic": topic}


def _admin_target(args) -> tuple[str, dict, HeadraceConfig | None]:
    """(bootstrap, client options, config) for the topic commands: --bootstrap, else -c's [source]."""
    cfg = _config(args) if args.config else None
    if args.bootstrap:
        return args.bootstrap, dict(cfg.source.client_options) if cfg else {}, cfg
    if cfg is None:
        raise ConfigError("topic: give -c CONFIG (its [source] bootstrap and client_options) or --bootstrap HOST:PORT")
    return cfg.source.bootstrap, dict(cfg.source.client_options), cfg


def _topic_configs(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--config-entry {pair!r}: expected KEY=VALUE, e.g. retention.ms=86400000")
        out[key] = value
    return out


def cmd_topic_create(args) -> dict:
    from streams.admin import create_topic

    bootstrap, options, cfg = _admin_target(args)
    names = args.names or (list(cfg.source.topics) if cfg else [])
    if not names:
        raise ConfigError("topic create: name the topic(s), or give -c CONFIG to create its [source] topics")
    configs = _topic_configs(args.config_entry)
    done = [{"name": n, "created": create_topic(bootstrap, n, args.partitions, replication_factor=args.replication_factor,
                                                configs=configs, client_options=options),
             "partitions": args.partitions} for n in names]
    return {"bootstrap": bootstrap, "topics": done}


def cmd_topic_list(args) -> dict | None:
    from streams.admin import describe_topics

    bootstrap, options, _ = _admin_target(args)
    topics = [{"name": t.name, "partitions": len(t.partitions), "internal": t.internal}
              for t in describe_topics(bootstrap, configs=False, client_options=options)]
    if args.json:
        return {"bootstrap": bootstrap, "topics": topics}
    for t in topics:
        sys.stdout.write(f"{t['name']}\t{t['partitions']} partition(s){' (internal)' if t['internal'] else ''}\n")
    return None


def cmd_topic_describe(args) -> dict | None:
    from streams.admin import describe_topics

    bootstrap, options, cfg = _admin_target(args)
    names = args.names or (list(cfg.source.topics) if cfg else None)
    infos = describe_topics(bootstrap, names, all_configs=args.all_configs, client_options=options)
    if args.json:
        return {"bootstrap": bootstrap, "topics": [t.to_dict() for t in infos]}
    for t in infos:
        sys.stdout.write(f"{t.name}: {len(t.partitions)} partition(s)\n")
        for p in t.partitions:
            sys.stdout.write(f"  partition {p.partition}: leader {p.leader}, replicas {list(p.replicas)}, "
                             f"isr {list(p.isr)}\n")
        for key, value in sorted(t.configs.items()):
            sys.stdout.write(f"  {key} = {value}\n")
    return None


def cmd_demo(args) -> dict:
    from engine.demo import demo

    return demo(events=args.events, max_seconds=args.max_seconds, workdir=args.workdir,
                rate_events_per_s=args.rate)


def cmd_cache_stat(args) -> dict:
    from storage.batch_cache import BatchCache

    cfg = _config(args)
    _require_cache(cfg)
    with BatchCache.from_config(cfg.cache, readonly=True) as cache:
        return cache.stat()


def cmd_cache_dead_letters(args) -> None:
    from storage.batch_cache import BatchCache
    from transforms.elements import Reason

    cfg = _config(args)
    _require_cache(cfg)
    try:
        reason = Reason(args.reason) if args.reason else None
    except ValueError:
        raise ConfigError(f"--reason {args.reason!r}: not one of {[r.value for r in Reason]}") from None
    with BatchCache.from_config(cfg.cache, readonly=True) as cache:
        for dl in cache.dead_letters(reason=reason, limit=args.limit):
            sys.stdout.write(orjson.dumps({
                "topic": dl.topic, "partition": dl.partition, "offset": dl.offset,
                "timestamp_ms": dl.timestamp_ms, "stage": dl.stage.value, "reason": dl.reason.value,
                "detail": dl.detail, "raw": dl.raw.decode("utf-8", "backslashreplace"),
            }).decode() + "\n")


def cmd_plan(args) -> dict | None:
    from trainer.planner import format_plan, plan_from_config

    cfg = _config(args)
    if args.device == "auto":  # the plan a train job here would build ([sharding] device)
        from trainer.distributed_loop import plan_for

        plan = plan_for(cfg, args.world_size)
    else:
        plan = plan_from_config(cfg, args.world_size, args.device)
    if args.json:
        return plan.to_dict()
    sys.stdout.write(format_plan(plan) + "\n")
    return None


def cmd_fit_hash(args) -> dict:
    from engine.fit_hash import fit_from_cache

    return fit_from_cache(_config(args))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="headrace",
        description="Streaming data plane and online trainer for deep recommendation models: "
                    "Kafka -> Beam -> Arrow batches in LMDB -> continuous DLRM training.",
        epilog="Summarising commands print one JSON object as their last line with --json.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    p.add_argument("--log-format", choices=[f.value for f in LogFormat], default=LogFormat.TEXT.value,
                   help="log lines on stderr as text or as one JSON object each (progress too, when "
                        "stderr is not a terminal)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable, help_: str, config: bool = True, json_: bool = True):
        sp = sub.add_parser(name, help=help_, description=help_)
        if config:
            sp.add_argument("--config", "-c", required=True, help="TOML config file")
        if json_:
            sp.add_argument("--json", action="store_true", help="print one JSON summary object as the last line")
        sp.set_defaults(fn=fn)
        return sp

    sp = add("broker", cmd_broker, "run the bundled Kafka-compatible broker on 127.0.0.1", config=False, json_=False)
    sp.add_argument("--port", type=int, default=0, help="port (0 = any free port; printed on start)")

    def add_listen(sp) -> None:
        sp.add_argument("--metrics-listen", default=None, metavar="HOST:PORT",
                        help="serve /metrics, /healthz, /readyz here (overrides [metrics] listen; "
                             "port 0 = any free port; '' = off)")

    sp = add("serve", cmd_serve, "stream Kafka into the cache and train continuously")
    add_listen(sp)
    sp.add_argument("--no-train", action="store_true", help="ingest only")
    sp.add_argument("--max-seconds", type=float, default=None, help="stop after this long (default: run until SIGTERM)")
    sp.add_argument("--status-file", default=None, metavar="PATH",
                    help="rewrite this JSON file about every second with counts, lag, trainer progress, "
                         "freshness, disk space and the processes' pids")

    sp = add("backfill", cmd_backfill, "replay logs or a Kafka range through the same pipeline into the cache")
    add_listen(sp)
    sp.add_argument("--from", dest="sources", nargs="+", required=True, metavar="PATH|kafka:TOPIC",
                    help="log files/globs/directories (.jsonl, .jsonl.gz, .tsv, .tsv.gz) or kafka:TOPIC")
    sp.add_argument("--start-offset", type=int, default=None)
    sp.add_argument("--end-offset", type=int, default=None, help="exclusive")
    sp.add_argument("--start-time", default=None, help="epoch ms or ISO-8601 (inclusive)")
    sp.add_argument("--end-time", default=None, help="epoch ms or ISO-8601 (exclusive)")

    sp = add("train", cmd_train, "train the model from the cache")
    add_listen(sp)
    sp.add_argument("--follow", action="store_true", help="keep waiting for new batches (until SIGTERM)")

    sp = add("feed", cmd_feed, "serve the cache's batches to trainers on other hosts over Arrow Flight")
    sp.add_argument("--listen", default="127.0.0.1:8815", metavar="HOST:PORT",
                    help="address to serve on (default loopback 127.0.0.1:8815; port 0 = any free port, printed)")
    sp.add_argument("--token-env", default=None, metavar="VAR",
                    help="require the bearer token held in this environment variable on every call")
    sp.add_argument("--tls-cert", default=None, metavar="PEM", help="serve grpc+tls with this certificate chain")
    sp.add_argument("--tls-key", default=None, metavar="PEM", help="the certificate's private key")

    sp = add("produce", cmd_produce, "publish a log file to Kafka, one message per line (per CSV record)", json_=True)
    sp.add_argument("--from", dest="path", required=True, help=".jsonl, .tsv or .csv file, optionally .gz")
    sp.add_argument("--topic", default=None, help="default: the first of [source] topics")
    sp.add_argument("--rate", type=float, default=None, metavar="EVENTS_PER_S")
    sp.add_argument("--create-topic", action="store_true", help="create the topic first if it does not exist")
    sp.add_argument("--partitions", type=int, default=None,
                    help="with --create-topic: its partition count (default 1; an existing topic must match)")

    topic = sub.add_parser("topic", help="create, list and describe Kafka topics (bundled broker or any Kafka)")
    tsub = topic.add_subparsers(dest="topic_command", required=True, metavar="SUBCOMMAND")

    def add_topic(name: str, fn: Callable, help_: str):
        tp = tsub.add_parser(name, help=help_, description=help_)
        tp.add_argument("--config", "-c", default=None, help="TOML config: its [source] bootstrap and client_options")
        tp.add_argument("--bootstrap", default=None, metavar="HOST:PORT", help="the brokers (instead of -c's)")
        tp.add_argument("--json", action="store_true", help="print one JSON summary object as the last line")
        tp.set_defaults(fn=fn)
        return tp

    tp = add_topic("create", cmd_topic_create, "create topics (idempotent; default: the config's [source] topics)")
    tp.add_argument("names", nargs="*", metavar="TOPIC")
    tp.add_argument("--partitions", type=int, default=1)
    tp.add_argument("--replication-factor", type=int, default=1)
    tp.add_argument("--config-entry", action="append", default=[], metavar="KEY=VALUE",
                    help="topic config, e.g. retention.ms=604800000 (repeatable)")
    add_topic("list", cmd_topic_list, "list topics with their partition counts")
    tp = add_topic("describe", cmd_topic_describe, "partitions (leader, replicas, ISR) and configs of topics")
    tp.add_argument("names", nargs="*", metavar="TOPIC", help="default: the config's [source] topics, else all")
    tp.add_argument("--all-configs", action="store_true", help="every config, not only the non-default ones")

    sp = add("demo", cmd_demo, "bundled broker + synthetic stream + serve, ending with a summary", config=False)
    sp.add_argument("--events", type=int, default=200_000)
    sp.add_argument("--max-seconds", type=float, default=600.0)
    sp.add_argument("--rate", type=float, default=None, metavar="EVENTS_PER_S", help="produce rate (default: as fast as possible)")
    sp.add_argument("--workdir", default=None, help="where the cache and checkpoints go (default: a temp dir)")

    cache = sub.add_parser("cache", help="inspect the batch cache")
    csub = cache.add_subparsers(dest="cache_command", required=True, metavar="SUBCOMMAND")
    sp = csub.add_parser("stat", help="batches, rows, bytes, offsets, dead letters, event-time range")
    sp.add_argument("--config", "-c", required=True)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_cache_stat)
    sp = csub.add_parser("dead-letters", help="print dead letters as JSON lines")
    sp.add_argument("--config", "-c", required=True)
    sp.add_argument("--reason", default=None, help="only this reason code")
    sp.add_argument("--limit", type=int, default=100)
    sp.set_defaults(fn=cmd_cache_dead_letters, json=False)

    sp = add("plan", cmd_plan, "plan how embedding tables are sharded across devices")
    sp.add_argument("--world-size", type=int, required=True)
    sp.add_argument("--device", choices=["auto", "cpu", "h100", "h200"], default="auto",
                    help="device kind to plan for (auto: [sharding] device, else this machine's)")

    add("fit-hash", cmd_fit_hash, "fit learned id -> row mappings from the cache's statistics")

    sp = add("export", cmd_export, "write the newest checkpoint as a model package (full, or a delta with --since)")
    sp.add_argument("--out", required=True, metavar="DIR", help="the package directory to create (must not exist)")
    sp.add_argument("--since", default=None, metavar="PACKAGE",
                    help="write a delta: only the embedding rows changed since this package (plus dense weights)")
    sp.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                    help="embedding table precision in the package (default: [export] dtype, fp32)")
    sp.add_argument("--checkpoint", default=None, metavar="PATH",
                    help="export this checkpoint (ckpt-*.pt or sharded-*/) instead of the newest")
    sp.add_argument("--no-program", action="store_true", help="skip the torch.export program of the dense part")

    sp = add("score", cmd_score, "score log files with an exported model through the training transforms",
             config=False)
    sp.add_argument("--config", "-c", default=None,
                    help="TOML config; optional, its schema and filter must be the model's")
    sp.add_argument("--model", required=True, metavar="DIR", help="a package written by headrace export")
    sp.add_argument("--from", dest="sources", nargs="+", required=True, metavar="PATH",
                    help="log files/globs/directories (.jsonl, .tsv, .csv, optionally .gz)")
    sp.add_argument("--out", default=None, metavar="PREDS.parquet",
                    help="write source, offset, label and prediction of every scored event")
    sp.add_argument("--no-labels", action="store_true",
                    help="the logs have no labels: score every event as predict does (no AUC)")

    sp = add("report", cmd_report, "PNG plots and an index.html of the model's metrics history (all runs)")
    sp.add_argument("--out", default=None, metavar="DIR", help="output directory (default: <checkpoint_dir>/report)")
    return p


_EXIT_INTERRUPTED = 130


def _final_word(text: str, fields: dict, log_format: str) -> None:
    """Why the command failed, on stderr: plain text, or a JSON log line with ``--log-format json``."""
    if LogFormat(log_format) is LogFormat.JSON:
        log.error(text, extra={"fields": fields})
    else:
        sys.stderr.write(text + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    configure_logging(level, args.log_format)
    try:
        result: Any = args.fn(args)
    except HEADRACE_ERRORS as exc:
        kind = "retriable " if exc.retriable else ""
        _final_word(f"headrace: {kind}error: {exc}", {"error": type(exc).__name__, "retriable": exc.retriable,
                                                      "exit_code": exit_code_of(exc)}, args.log_format)
        return exit_code_of(exc)
    except KeyboardInterrupt as exc:
        _final_word(f"headrace: interrupted{': ' + str(exc) if str(exc) else ''}",
                    {"error": "interrupted", "exit_code": _EXIT_INTERRUPTED}, args.log_format)
        return _EXIT_INTERRUPTED
    if isinstance(result, dict):
        _emit(result, getattr(args, "json", False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
