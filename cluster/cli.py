"""The `raytrieval` command line: one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from raytrieval.cluster.flags import add_fields, given
from raytrieval.cluster.runtime import apply_offline_env
from raytrieval.retrieval.configfile import read_yaml_mapping


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags of an off-the-shelf model (`ModelSpec`)."""
    from raytrieval.retrieval.model import ModelSpec

    g = p.add_argument_group("model")
    add_fields(g, ModelSpec, "model", skip=("pooling_kwargs",))
    g.add_argument("--gem-p", type=float, default=argparse.SUPPRESS,
                   help="initial GeM power, recorded in pooling_kwargs (default: GeM's)")


def model_spec(args: argparse.Namespace):
    """The `ModelSpec` of the model flags; a GeM spec records its power (`--gem-p` or GeM's default)."""
    import inspect

    from raytrieval.retrieval.model import ModelSpec
    from raytrieval.retrieval.pooling import GeM

    fields = given(args, "model")
    if fields.get("pooling", ModelSpec.pooling) == "gem":
        fields["pooling_kwargs"] = {"p": getattr(args, "gem_p", inspect.signature(GeM).parameters["p"].default)}
    return ModelSpec(**fields)


def add_address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else embedded local Ray)")


def add_rerank_args(p: argparse.ArgumentParser) -> None:
    """Flags of `RerankConfig` (`--rerank` names its steps)."""
    from raytrieval.evaluation.rerank import RerankConfig

    add_fields(p.add_argument_group("whitening and re-ranking"), RerankConfig, "rerank", rename={"steps": "rerank"})


def cmd_eval(args: argparse.Namespace) -> int:
    from raytrieval.cluster.eval_stage import EvalConfig, run_eval
    from raytrieval.evaluation.rerank import RerankConfig

    run_eval(EvalConfig(**given(args, "eval"), model=model_spec(args), rerank=RerankConfig(**given(args, "rerank"))))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from raytrieval.evaluation.demo import generate_demo

    print(generate_demo(args.out, seed=args.seed))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from raytrieval.retrieval.manifest import build_manifest, write_manifest

    table = build_manifest(args.source, threads=args.threads)
    write_manifest(table, args.out)
    status = table.column("status").to_pylist()
    bad = [(u, s) for u, s in zip(table.column("uri").to_pylist(), status) if s != "ok"]
    print(f"{len(status) - len(bad)} images ok, {len(bad)} rejected -> {args.out}")
    for uri, reason in bad:
        print(f"  rejected {uri}: {reason}")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from raytrieval.cluster.runtime import init_ray
    from raytrieval.mining.stages import CleanConfig, clean
    from raytrieval.mining.verify import VerifyConfig

    cfg = CleanConfig(**given(args, "clean"), model=model_spec(args), verify=VerifyConfig(**given(args, "verify")))
    if cfg.workers > 0:
        init_ray(args.address)
    record = clean(cfg)
    counts = record["counts"]
    print(f"{counts['images']} images, {counts['candidate_pairs']} candidate pairs, "
          f"{counts['verified_pairs']} verified, {counts['clusters']} clusters holding "
          f"{counts['clustered_images']} images -> {cfg.run_dir}")
    for image_id, reason in record["skipped"].items():
        print(f"  skipped {image_id}: {reason}")
    return 0


def cmd_mine(args: argparse.Namespace) -> int:
    from raytrieval.cluster.runtime import init_ray
    from raytrieval.mining.stages import DESCRIPTORS_FILE, MineConfig, mine

    cfg = MineConfig(**given(args, "mine"), model=model_spec(args))
    if cfg.workers > 0 and not (Path(cfg.run_dir) / DESCRIPTORS_FILE).is_file():
        init_ray(args.address)
    record = mine(cfg)
    counts = record["counts"]
    print(f"{counts['tuples']} {cfg.method} tuples over {counts['images']} images -> {record['out']}")
    return 0


def clean_args(p: argparse.ArgumentParser) -> None:
    from raytrieval.mining.stages import CleanConfig
    from raytrieval.mining.verify import VerifyConfig

    add_fields(p, CleanConfig, "clean", skip=("model", "verify", "colmap"))
    add_fields(p.add_argument_group("local features and verification"), VerifyConfig, "verify",
               rename={"max_size": "local_max_size", "model": "geometry", "root": "rootsift", "method": "estimator"})
    add_model_args(p)
    add_address_arg(p)
    p.set_defaults(func=cmd_clean)


def mine_args(p: argparse.ArgumentParser) -> None:
    from raytrieval.mining.stages import MineConfig

    add_fields(p, MineConfig, "mine", skip=("model",))
    add_model_args(p)
    add_address_arg(p)
    p.set_defaults(func=cmd_mine)


def cmd_index_build(args: argparse.Namespace) -> int:
    from raytrieval.cluster.index_stage import build_index

    if args.checkpoint:
        source = {"checkpoint": str(Path(args.checkpoint).resolve())}
    else:
        spec = model_spec(args)
        if spec.weights not in (None, "imagenet"):
            spec.weights = str(Path(spec.weights).resolve())
        source = {"spec": spec.to_dict()}
    build_index(args.images, source, args.out, workers=args.workers, config=given(args, "index"),
                address=args.address, regions=args.regions)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from raytrieval.cluster.runtime import init_ray, serve_until_stopped
    from raytrieval.serving.app import AppArgs, run_server

    app_args = AppArgs(**given(args, "serve"))
    init_ray(args.address)
    run_server(app_args, host=args.host, port=args.port)
    print(f"serving {app_args.index} at http://{args.host}:{args.port}/ (Ctrl-C stops)\n{token_hint(app_args.index)}",
          flush=True)
    return serve_until_stopped()


def token_hint(index: str) -> str:
    """How to send the token that POST/DELETE /images need."""
    from raytrieval.serving.ingress import TOKEN_FILE

    if os.environ.get("RAYTRIEVAL_TOKEN"):
        return "adding/deleting images: send 'Authorization: Bearer $RAYTRIEVAL_TOKEN'"
    return f"adding/deleting images: send \"Authorization: Bearer $(cat {Path(index) / TOKEN_FILE})\""


def _byte_size(text: str) -> float:
    """'123', '512M', '2G' -> bytes."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    text = text.strip().upper().removesuffix("B")
    try:
        return float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--memory: expected bytes such as 512M or 2G, got {text!r}") from None


def index_args(p: argparse.ArgumentParser) -> None:
    from raytrieval.serving.index import IndexConfig

    isub = p.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="embed a folder or manifest and write an index directory")
    b.add_argument("--images", required=True, help="image folder or images.parquet manifest")
    b.add_argument("--checkpoint", default=None, help="model checkpoint directory (default: --backbone ...)")
    b.add_argument("--out", default="runs/index")
    b.add_argument("--workers", type=int, default=0, help="Ray embedding actors (0: in this process)")
    b.add_argument("--regions", default=None,
                   help="regions.parquet of learned proposals (`raytrieval regions`) for the served region re-ranking")
    add_address_arg(b)
    add_fields(b.add_argument_group("index"), IndexConfig, "index", parse={"memory": _byte_size})
    add_model_args(b)
    b.set_defaults(func=cmd_index_build)


def serve_args(p: argparse.ArgumentParser) -> None:
    from raytrieval.serving.app import AppArgs

    add_fields(p, AppArgs, "serve", skip=("index_config",), defaults={"index": "runs/index"},
               rename={"embedder_replicas": "embedders", "public_hosts": "public_host"})
    p.add_argument("--host", default="127.0.0.1", help="listen address (non-loopback needs RAYTRIEVAL_TOKEN)")
    p.add_argument("--port", type=int, default=8000)
    add_address_arg(p)
    p.set_defaults(func=cmd_serve)


def _query_model(index_dir: Path, checkpoint: str | None):
    """The model that embeds queries of an index (its recorded model, or `checkpoint`)."""
    from raytrieval.serving.app import model_source

    return model_source(index_dir, checkpoint).load()


def cmd_recognize(args: argparse.Namespace) -> int:
    from raytrieval.retrieval.recognition import RecognitionConfig
    from raytrieval.serving.recognition import Recognizer, write_recognition

    index_dir = Path(args.index)
    if not (index_dir / "meta.json").is_file():
        raise FileNotFoundError(f"index: no meta.json in {index_dir}; run `raytrieval index build` first")
    model = None
    if args.clusters:
        if args.crops:
            model = _query_model(index_dir, args.checkpoint)
        cal = write_recognition(index_dir, args.clusters, RecognitionConfig(**given(args, "recognition")),
                                crops_model=model)
        counts = cal.counts
        found = (f"threshold {cal.threshold:.4f}: pseudo-precision {100 * cal.precision:.1f}%, coverage "
                 f"{100 * cal.coverage:.1f}% of clustered images" if cal.threshold is not None
                 else "no threshold reaches it: every query will be unknown")
        print(f"calibrated on {counts['clustered']} clustered + {counts['unclustered']} unclustered images "
              f"({counts['clusters']} clusters), target {100 * cal.target:.0f}%: {found} -> "
              f"{index_dir / 'recognition.json'}")
    recognizer = Recognizer(index_dir)
    if not args.images:
        return 0
    from raytrieval.retrieval.extract import extract_descriptors
    from raytrieval.serving.index import ImageIndex

    model = model or _query_model(index_dir, args.checkpoint)
    vectors = extract_descriptors(model, list(args.images), scales=model.spec.scales, max_size=model.spec.max_size,
                                  progress=False)
    index = ImageIndex.open(index_dir)
    try:
        answers = recognizer.recognize(index, vectors)
    finally:
        index.close()
    for path, a in zip(args.images, answers):
        t = "none" if a["threshold"] is None else f"{a['threshold']:.4f}"
        if a["landmark"] is not None:
            print(f"{path}\tlandmark {a['landmark']}\tconfidence {a['confidence']:.4f} (threshold {t})")
        else:
            print(f"{path}\tunknown\tconfidence {a['confidence']:.4f} (threshold {t}, best cluster {a['candidate']})")
    return 0


def recognize_args(p: argparse.ArgumentParser) -> None:
    from raytrieval.retrieval.recognition import RecognitionConfig

    p.add_argument("images", nargs="*", help="query images to recognise")
    p.add_argument("--index", default="runs/index", help="index directory from `raytrieval index build`")
    p.add_argument("--clusters", default=None,
                   help="clusters.parquet of the clean stage: calibrate on it and write <index>/recognition.json")
    add_fields(p, RecognitionConfig, "recognition")
    p.add_argument("--crops", action="store_true",
                   help="calibrate on the clustered images cropped to their cluster boxes (re-embedded; for queries "
                        "that show only the landmark) instead of the indexed vectors")
    p.add_argument("--checkpoint", default=None, help="query model (default: the model the index was built with)")
    p.set_defaults(func=cmd_recognize)


def cmd_regions(args: argparse.Namespace) -> int:
    from raytrieval.cluster.runtime import init_ray
    from raytrieval.retrieval.manifest import ok_images, read_manifest
    from raytrieval.retrieval.regions import REGIONS_FILE, write_regions
    from raytrieval.retrieval.rpn import collection_regions, load_proposal_net
    from raytrieval.trainers.rpn import RpnConfig, backbone_model, fit_rpn

    run = Path(args.run_dir)
    for name in ("images.parquet", "clusters.parquet"):
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run / name} does not exist: run `raytrieval clean --run-dir {run}` first")
    cfg = RpnConfig(manifest=str(run / "images.parquet"), clusters=str(run / "clusters.parquet"), out=str(run),
                    name="rpn", **given(args, "rpn"))
    init_ray(args.address, log_file=run / "ray.log")
    final = fit_rpn(cfg)
    print(f"[regions] proposal head trained on the clean stage's boxes -> {final}", flush=True)
    table = ok_images(read_manifest(run / "images.parquet"))
    regions = collection_regions(backbone_model(cfg), load_proposal_net(final), table.column("image_id").to_pylist(),
                                 table.column("uri").to_pylist())
    out = write_regions(regions, run / REGIONS_FILE)
    print(f"[regions] {regions.num_rows} proposals of {table.num_rows} images -> {out} (for `eval --rerank casr "
          f"--regions {out}`)", flush=True)
    return 0


def regions_args(p: argparse.ArgumentParser) -> None:
    from raytrieval.trainers.rpn import RpnConfig

    p.add_argument("--run-dir", required=True, help="run directory with images.parquet and clusters.parquet")
    add_fields(p, RpnConfig, "rpn", skip=("manifest", "clusters", "out", "name"), rename={"model": "checkpoint"})
    add_address_arg(p)
    p.set_defaults(func=cmd_regions)


def cmd_attention(args: argparse.Namespace) -> int:
    from raytrieval.trainers.attention import AttentionConfig, train_attention

    facts = train_attention(AttentionConfig(run_dir=args.run_dir, out=args.out, **given(args, "attention")))
    print(f"[attention] {facts['classes']} pseudo-landmarks, {facts['images']} images: classifier accuracy "
          f"{facts['accuracy']:.3f}, nearest-cluster-mean accuracy {facts['nearest_mean_accuracy_before']:.3f} -> "
          f"{facts['nearest_mean_accuracy_after']:.3f} -> {facts['checkpoint']}", flush=True)
    kept = (f"epoch {facts['best_epoch']} of {facts['epochs_trained']} kept" if "best_epoch" in facts
            else "last epoch kept")
    print(f"[attention] {kept}: {facts['stopping']}", flush=True)
    return 0


def attention_args(p: argparse.ArgumentParser) -> None:
    from raytrieval.trainers.attention import AttentionConfig

    p.add_argument("--run-dir", required=True, help="run directory with images.parquet and clusters.parquet")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    add_fields(p, AttentionConfig, "attention", skip=("run_dir", "out"))
    p.set_defaults(func=cmd_attention)


def cmd_box_classifier(args: argparse.Namespace) -> int:
    from raytrieval.retrieval.cssr import BoxClassifierConfig, load_box_classifier, train_from_run
    from raytrieval.retrieval.source import ModelSource

    source = ModelSource(checkpoint=args.checkpoint) if args.checkpoint else ModelSource(spec=model_spec(args))
    out = train_from_run(args.run_dir, source, args.regions, BoxClassifierConfig(**given(args, "boxcls")), args.out)
    classifier = load_box_classifier(out)
    meta = classifier.meta
    print(f"[box-classifier] {len(classifier.classes)} pseudo-landmarks + background, "
          f"{meta['examples']['positive']} positive / {meta['examples']['background']} background boxes of "
          f"{meta['images']} images -> {out} (for `eval --rerank cssr --box-classifier {out}`)", flush=True)
    return 0


def box_classifier_args(p: argparse.ArgumentParser) -> None:
    from raytrieval.retrieval.cssr import BoxClassifierConfig

    p.add_argument("--run-dir", required=True, help="run directory with images.parquet and clusters.parquet")
    p.add_argument("--checkpoint", default=None, help="retrieval checkpoint the re-ranking uses (default: the model flags)")
    p.add_argument("--regions", default=None, help="regions.parquet of learned proposals (default: grid proposals)")
    p.add_argument("--out", default=None, help="file to write (default: RUN_DIR/box_classifier.pt)")
    add_model_args(p)
    add_fields(p.add_argument_group("box classifier"), BoxClassifierConfig, "boxcls", skip=("max_size",))  # the model's
    p.set_defaults(func=cmd_box_classifier)


def set_overrides(items: Sequence[str] | None) -> dict[str, Any]:
    """`--set KEY=VALUE` flags as a dict (values parsed as YAML)."""
    import yaml

    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set: expected KEY=VALUE, got {item!r}")
        overrides[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return overrides


def cmd_train(args: argparse.Namespace) -> int:
    from raytrieval.cluster.runtime import init_ray
    from raytrieval.evaluation.report import PROTOCOLS
    from raytrieval.trainers.config import TrainConfig
    from raytrieval.trainers.fit import fit

    overrides = {**set_overrides(args.set), **given(args, "train")}
    cfg = TrainConfig.from_yaml(args.config, **overrides) if args.config else TrainConfig.from_dict(overrides)
    init_ray(cfg.address)
    result = fit(cfg)
    from raytrieval.trainers.loop import best_epoch

    keys = [k for k in ("self_map",) if k in result.history[-1]] + (
        [f"val_map_{p}" for p in PROTOCOLS if f"val_map_{p}" in result.history[-1]] or [
            k for k in ("val_map", "val_ns_score") if k in result.history[-1]])
    print("epoch      loss  " + "  ".join(f"{k.removeprefix('val_'):>14}" for k in keys))
    for h in result.history:
        loss = f"{h['loss']:8.4f}" if "loss" in h else "       -"
        print(f"{h['epoch']:5d}  {loss}  " + "  ".join(f"{100 * h.get(k, float('nan')):14.1f}" for k in keys))
    version = f", registered version {result.model_version}" if result.model_version is not None else ""
    chosen = f" = epoch {best_epoch(result.history)}, the best self_map" if "self_map" in keys else ""
    print(f"final checkpoint {result.checkpoint}{chosen} (MLflow run {result.run_id}{version})")
    return 0


def train_args(p: argparse.ArgumentParser) -> None:
    from raytrieval.trainers.config import TrainConfig

    p.add_argument("--config", default=None, help="YAML file of TrainConfig fields (e.g. configs/train.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config field (YAML value)")
    add_fields(p, TrainConfig, "train", only=("workers", "use_gpu", "epochs", "out", "name", "tracking_uri", "address"),
               rename={"use_gpu": "gpus"}, from_config=True)
    p.set_defaults(func=cmd_train)


def cmd_tune(args: argparse.Namespace) -> int:
    from raytrieval.cluster.runtime import init_ray
    from raytrieval.trainers.sweep import run_sweep
    from raytrieval.trainers.sweep_config import SweepConfig
    from raytrieval.trainers.sweep_report import markdown_table

    overrides = given(args, "tune")
    train = set_overrides(args.set)
    if train:
        base = read_yaml_mapping(args.config).get("train", {})
        overrides["train"] = {**base, **train}
    cfg = SweepConfig.from_yaml(args.config, **overrides)
    init_ray(cfg.address)
    result = run_sweep(cfg)
    print(markdown_table(result.trials, cfg))
    if result.best:
        version = f", registered version {result.model_version} @{cfg.champion_alias}" if result.model_version else ""
        print(f"best {result.best['trial_id']} {result.best['params']}: {cfg.metric} {100 * result.best['best']:.1f} "
              f"at epoch {result.best['best_epoch']}; champion {result.champion}{version}")
    print(f"table and plots: {cfg.sweep_dir / 'trials.md'}")
    return 0 if result.best else 1


def tune_args(p: argparse.ArgumentParser) -> None:
    from raytrieval.trainers.sweep_config import SweepConfig

    p.add_argument("--config", required=True, help="YAML of SweepConfig fields (e.g. configs/tune.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field of the base train config")
    add_fields(p, SweepConfig, "tune", only=("searcher", "num_samples", "max_concurrent_trials", "out", "name",
                                              "tracking_uri", "address"),
               rename={"max_concurrent_trials": "max_concurrent"}, from_config=True)
    p.set_defaults(func=cmd_tune)


def cmd_pipeline(args: argparse.Namespace) -> int:
    from raytrieval.cluster.pipeline import Pipeline, PipelineConfig, example_query, headline_table
    from raytrieval.cluster.runtime import serve_until_stopped

    fields = given(args, "pipeline")
    cfg = PipelineConfig.from_yaml(args.config, **fields) if args.config else PipelineConfig(**fields)
    if "collection" in fields:  # a bare folder: no benchmark unless one is named (it only scores)
        import dataclasses

        run_dir = fields.get("run_dir") or (
            cfg.run_dir if args.config else f"runs/pipeline/{Path(fields['collection']).resolve().name}")
        cfg = dataclasses.replace(cfg, benchmark=fields.get("benchmark"), run_dir=run_dir)
    pipeline = Pipeline(cfg)
    records = pipeline.run()
    print(headline_table(records))
    print(f"report: {records['report']['summary']['html']}")
    if not cfg.serve:
        return 0
    from raytrieval.serving.app import AppArgs, run_server

    index = str(pipeline.path("index"))
    run_server(AppArgs(index=index), port=cfg.port)
    print(f"serving at http://127.0.0.1:{cfg.port}/ (web page; Ctrl-C stops)\n{token_hint(index)}")
    print(example_query(pipeline, cfg.port), flush=True)
    return serve_until_stopped()


def pipeline_args(p: argparse.ArgumentParser) -> None:
    from raytrieval.cluster.pipeline import PipelineConfig

    p.add_argument("--config", default=None, help="YAML of PipelineConfig fields (default: the embedded demo)")
    add_fields(p, PipelineConfig, "pipeline", only=("collection", "benchmark", "run_dir", "workers", "port", "serve",
                                                    "address"), rename={"collection": "images"}, from_config=True)
    p.set_defaults(func=cmd_pipeline)


def eval_args(p: argparse.ArgumentParser) -> None:
    from raytrieval.cluster.eval_stage import EvalConfig

    add_fields(p, EvalConfig, "eval", skip=("model", "rerank"))
    add_model_args(p)
    add_rerank_args(p)
    p.set_defaults(func=cmd_eval)


def demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/data")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)


def ingest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="image folder")
    p.add_argument("--out", default="runs/ingest/images.parquet")
    p.add_argument("--threads", type=int, default=None,
                   help="threads reading and checking files (default: one per core)")
    p.set_defaults(func=cmd_ingest)


# name -> (help, the function that adds its flags): a command's flags import its config module
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "eval": ("mAP of a model on a benchmark (revisitop protocol)", eval_args),
    "demo": ("generate the embedded demo collection", demo_args),
    "ingest": ("decode-check a folder of images into images.parquet", ingest_args),
    "clean": ("kNN pairs -> spatial verification -> clusters (pseudo-landmarks) and boxes", clean_args),
    "mine": ("training tuples: sfm | hardneg | manifold", mine_args),
    "index": ("faiss index of a collection for serving", index_args),
    "serve": ("Ray Serve HTTP endpoint and web page over an index", serve_args),
    "recognize": ("pseudo-landmark of query images by a kNN vote over the clusters, "
                  "'unknown' below a threshold calibrated without labels", recognize_args),
    "regions": ("learned region proposals: an RPN head trained (Ray Train) on the clean "
                "stage's verified boxes, then regions.parquet of the whole collection", regions_args),
    "attention": ("regional-attention head trained on the clean stage's clusters (backbone frozen) "
                  "-> a retrieval checkpoint", attention_args),
    "box-classifier": ("CS-SR box classifier over the clean stage's pseudo-landmarks (+ background), trained "
                       "label-free on region descriptors of the frozen model", box_classifier_args),
    "train": ("fine-tune on mined tuples with Ray Train (siamese / triplet), tracked in MLflow", train_args),
    "tune": ("Ray Tune sweep of fine-tuning runs (ASHA on validation mAP), tracked in MLflow", tune_args),
    "pipeline": ("ingest -> clean -> split -> mine -> train -> select -> [evaluate] -> index "
                 "-> report -> serve", pipeline_args),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `raytrieval` parser; given a `command`, only that subcommand gets its flags (a fast
    start: each command's flags import its config module); "" gives none of them flags."""
    parser = argparse.ArgumentParser(prog="raytrieval", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (text, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=text)
        if command in (None, name):
            add_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    apply_offline_env()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(next((a for a in argv if a in COMMANDS), "")).parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"raytrieval {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C in any stage: stop Ray (an embedded one ends with us)
        from raytrieval.cluster.runtime import INTERRUPTED, shutdown_ray

        print(f"raytrieval {args.command}: interrupted", file=sys.stderr)
        shutdown_ray()
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
