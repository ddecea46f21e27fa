"""The `raytrieval` command line: one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from raytrieval.cluster.runtime import apply_offline_env
from raytrieval.retrieval.configfile import read_yaml_mapping


def _floats(text: str) -> tuple[float, ...]:
    """'1,0.7071,0.5' -> (1.0, 0.7071, 0.5)."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags that define an off-the-shelf model (`ModelSpec`)."""
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="efficientnet_lite0")
    g.add_argument("--pooling", default="gem", help="mac | spoc | gem | rmac | crow")
    g.add_argument("--gem-p", type=float, default=3.0, help="initial GeM power")
    g.add_argument("--weights", default="imagenet", help="'imagenet', a local state-dict file, or 'none'")
    g.add_argument("--scales", type=_floats, default=(1.0,), help="e.g. 1 or 1,0.7071,0.5")
    g.add_argument("--max-size", type=int, default=512, help="longer image side")


def model_spec(args: argparse.Namespace):
    from raytrieval.retrieval.model import ModelSpec

    return ModelSpec(
        backbone=args.backbone,
        pooling=args.pooling,
        pooling_kwargs={"p": args.gem_p} if args.pooling == "gem" else {},
        max_size=args.max_size,
        scales=args.scales,
        weights=None if args.weights == "none" else args.weights,
    )


def add_ray_args(p: argparse.ArgumentParser, workers: int = 2) -> None:
    g = p.add_argument_group("ray")
    g.add_argument("--workers", type=int, default=workers, help="Ray actors (0: no Ray, in-process)")
    g.add_argument("--address", default=None, help="Ray cluster address (default: embedded local Ray)")


def add_rerank_args(p: argparse.ArgumentParser) -> None:
    """Flags of `RerankConfig`."""
    g = p.add_argument_group("whitening and re-ranking")
    g.add_argument("--whiten", choices=("pca", "lw"), default=None,
                   help="pca: learned on the database; lw: from spatially verified database pairs")
    g.add_argument("--dim", type=int, default=None, help="whitened dimension")
    g.add_argument("--shrinkage", type=float, default=1.0, help="PCA-whitening eigenvalue power")
    g.add_argument("--rerank", default="", help="comma-separated: dba, aqe | alpha_qe, diffusion, sv, region, casr")
    g.add_argument("--qe-k", type=int, default=2)
    g.add_argument("--qe-alpha", type=float, default=3.0)
    g.add_argument("--dba-k", type=int, default=3)
    g.add_argument("--diffusion-k", type=int, default=20)
    g.add_argument("--diffusion-kq", type=int, default=5)
    g.add_argument("--diffusion-truncate", type=int, default=None,
                   help="diffuse each query over the subgraph of its N nearest images (large databases)")
    g.add_argument("--sv-top", type=int, default=50)
    g.add_argument("--region-top", type=int, default=50)
    g.add_argument("--casr-top", type=int, default=100, help="images re-ranked by their best proposal (casr)")
    g.add_argument("--casr-pool", choices=("sum", "max"), default="sum",
                   help="proposal descriptors of casr: RPA-sum (localises whole objects) or RPA-max")


def rerank_config(args: argparse.Namespace):
    from raytrieval.evaluation.rerank import RerankConfig

    return RerankConfig(
        whiten=args.whiten, dim=args.dim, shrinkage=args.shrinkage,
        steps=tuple(s.strip() for s in args.rerank.split(",") if s.strip()),
        qe_k=args.qe_k, qe_alpha=args.qe_alpha, dba_k=args.dba_k, diffusion_k=args.diffusion_k,
        diffusion_kq=args.diffusion_kq, diffusion_truncate=args.diffusion_truncate, sv_top=args.sv_top, region_top=args.region_top,
        casr_top=args.casr_top, casr_pool=args.casr_pool,
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from raytrieval.cluster.eval_stage import EvalConfig, run_eval

    run_eval(EvalConfig(
        dataset=args.dataset, data_root=args.data_root, model=model_spec(args), checkpoint=args.checkpoint,
        rerank=rerank_config(args), workers=args.workers, address=args.address, out=args.out,
        regions=args.regions,
    ))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from raytrieval.evaluation.demo import generate_demo

    print(generate_demo(args.out, seed=args.seed))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from raytrieval.retrieval.manifest import build_manifest, write_manifest

    table = build_manifest(args.source)
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

    cfg = CleanConfig(
        run_dir=args.run_dir, manifest=args.manifest, model=model_spec(args), checkpoint=args.checkpoint,
        workers=args.workers, k=args.k, min_similarity=args.min_similarity, min_inliers=args.min_inliers,
        min_size=args.min_size, box_quantile=args.box_quantile, clusters=args.clusters,
        verify=VerifyConfig(max_size=args.local_max_size, max_features=args.max_features, model=args.geometry),
    )
    if cfg.workers > 0:
        init_ray(args.address)
    record = clean(cfg)
    counts = record["counts"]
    print(f"{counts['images']} images, {counts['candidate_pairs']} candidate pairs, "
          f"{counts['verified_pairs']} verified, {counts['clusters']} clusters holding "
          f"{counts['clustered_images']} images -> {args.run_dir}")
    for image_id, reason in record["skipped"].items():
        print(f"  skipped {image_id}: {reason}")
    return 0


def cmd_mine(args: argparse.Namespace) -> int:
    from raytrieval.cluster.runtime import init_ray
    from raytrieval.mining.stages import DESCRIPTORS_FILE, MineConfig, mine

    cfg = MineConfig(
        run_dir=args.run_dir, method=args.method, positive=args.positive, tau=args.tau,
        num_negatives=args.num_negatives, pool_size=args.pool_size, exclude_knn=args.exclude_knn, epoch=args.epoch,
        seed=args.seed, k=args.k,
        k_euclidean=args.k_euclidean, k_manifold=args.k_manifold, num_anchors=args.num_anchors,
        workers=args.workers, model=model_spec(args), out=args.out,
    )
    if cfg.workers > 0 and not (Path(cfg.run_dir) / DESCRIPTORS_FILE).is_file():
        init_ray(args.address)
    record = mine(cfg)
    counts = record["counts"]
    print(f"{counts['tuples']} {cfg.method} tuples over {counts['images']} images -> {record['out']}")
    return 0


def add_clean_command(sub) -> None:
    p = sub.add_parser("clean", help="kNN pairs -> spatial verification -> clusters (pseudo-landmarks) and boxes")
    p.add_argument("--manifest", default=None, help="images.parquet (default <run-dir>/images.parquet)")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--checkpoint", default=None, help="embed with this checkpoint directory")
    p.add_argument("--k", type=int, default=10, help="candidate neighbours per image")
    p.add_argument("--min-similarity", type=float, default=None, help="drop candidate pairs below this similarity")
    p.add_argument("--min-inliers", type=int, default=15, help="inliers that join two images")
    p.add_argument("--min-size", type=int, default=2, help="smallest cluster kept")
    p.add_argument("--box-quantile", type=float, default=0.0, help="0: union of inlier boxes; q>0: robust extent")
    p.add_argument("--local-max-size", type=int, default=1024, help="longer side for local features")
    p.add_argument("--max-features", type=int, default=1000, help="SIFT keypoints per image")
    p.add_argument("--geometry", default="homography", help="homography | fundamental")
    p.add_argument("--clusters", default="components", choices=("components", "colmap"),
                   help="clusters from connected components of the verified pairs, or from COLMAP's 3-D "
                        "models of them (needs pycolmap: pip install 'raytrieval[colmap]')")
    add_model_args(p)
    add_ray_args(p)
    p.set_defaults(func=cmd_clean)


def add_mine_command(sub) -> None:
    p = sub.add_parser("mine", help="training tuples: sfm | hardneg | manifold")
    p.add_argument("--method", default="sfm", help="sfm | hardneg | manifold")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--positive", default="inliers", help="sfm/hardneg positives: inliers | descriptor | random")
    p.add_argument("--tau", type=int, default=15, help="inliers a positive needs")
    p.add_argument("--num-negatives", type=int, default=5)
    p.add_argument("--pool-size", type=int, default=2000, help="random pool the negatives come from")
    p.add_argument("--exclude-knn", type=int, default=10,
                   help="sfm/hardneg: no negative from a cluster linked to the query's by the kNN graph (0: off)")
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=30, help="manifold: kNN graph neighbours")
    p.add_argument("--k-euclidean", type=int, default=50, help="manifold: Euclidean neighbours per anchor")
    p.add_argument("--k-manifold", type=int, default=50, help="manifold: manifold neighbours per anchor")
    p.add_argument("--num-anchors", type=int, default=None, help="manifold: at most this many anchors")
    p.add_argument("--out", default=None, help="tuples file (default <run-dir>/tuples.parquet)")
    add_model_args(p)
    add_ray_args(p)
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
    config = {"kind": args.kind, "factory": args.factory, "refine": args.refine, "k_factor": args.k_factor,
              "max_bytes_per_vector": args.max_bytes_per_vector, "memory": args.memory,
              "recall_target": args.recall_target, "nprobe": args.nprobe, "ef_search": args.ef_search,
              "hnsw_m": args.hnsw_m, "nlist": args.nlist, "pq_m": args.pq_m, "pq_nbits": args.pq_nbits}
    build_index(args.images, source, args.out, workers=args.workers, config=config, address=args.address)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from raytrieval.cluster.runtime import init_ray, serve_until_stopped
    from raytrieval.serving.app import AppArgs, run_server

    app_args = AppArgs(index=args.index, checkpoint=args.checkpoint, model_uri=args.model_uri,
                       tracking_uri=args.tracking_uri, embedder_replicas=args.embedders,
                       public_hosts=args.public_host or [])
    init_ray(args.address)
    run_server(app_args, host=args.host, port=args.port)
    print(f"serving {args.index} at http://{args.host}:{args.port}/ (Ctrl-C stops)\n{token_hint(args.index)}",
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


def add_index_command(sub) -> None:
    p = sub.add_parser("index", help="faiss index of a collection for serving")
    isub = p.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="embed a folder or manifest and write an index directory")
    b.add_argument("--images", required=True, help="image folder or images.parquet manifest")
    b.add_argument("--checkpoint", default=None, help="model checkpoint directory (default: --backbone ...)")
    b.add_argument("--out", default="runs/index")
    b.add_argument("--kind", default="auto",
                   help="auto (chosen from N, D, --max-bytes-per-vector / --memory and --recall-target), flat, lsh, "
                        "pq, ivfflat, ivfpq, imi, opq, hnsw or factory")
    b.add_argument("--factory", default=None, help="faiss factory string for --kind factory (e.g. OPQ32,IVF4096,PQ32,RFlat)")
    b.add_argument("--refine", default=None, choices=("flat", "fp16", "sq8"),
                   help="re-rank a shortlist of k * --k-factor exactly from a float32 / float16 / 8-bit store")
    b.add_argument("--k-factor", type=int, default=4, help="re-ranking shortlist factor")
    b.add_argument("--max-bytes-per-vector", type=float, default=None, help="auto: memory budget per vector")
    b.add_argument("--memory", type=_byte_size, default=None, help="auto: total memory budget (bytes, or 512M, 2G)")
    b.add_argument("--recall-target", type=float, default=0.95, help="auto: recall@10 against exact search")
    b.add_argument("--nprobe", type=int, default=16, help="IVF lists visited per query")
    b.add_argument("--nlist", type=int, default=None, help="IVF lists (default 4 sqrt(N))")
    b.add_argument("--pq-m", type=int, default=None, help="PQ bytes per vector")
    b.add_argument("--pq-nbits", type=int, default=8, help="bits per PQ code")
    b.add_argument("--hnsw-m", type=int, default=32)
    b.add_argument("--ef-search", type=int, default=64)
    add_model_args(b)
    add_ray_args(b, workers=0)
    b.set_defaults(func=cmd_index_build)


def add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="Ray Serve HTTP endpoint and web page over an index")
    p.add_argument("--index", default="runs/index", help="index directory from `raytrieval index build`")
    p.add_argument("--host", default="127.0.0.1", help="listen address (non-loopback needs RAYTRIEVAL_TOKEN)")
    p.add_argument("--public-host", action="append", default=None, metavar="NAME",
                   help="a host name clients use besides loopback (repeatable; needs RAYTRIEVAL_TOKEN)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--checkpoint", default=None, help="query model (default: the model the index was built with)")
    p.add_argument("--model-uri", default=None, help="MLflow model, e.g. models:/raytrieval@champion")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for --model-uri")
    p.add_argument("--embedders", type=int, default=1, help="embedder replicas")
    p.add_argument("--address", default=None, help="Ray cluster address (default: embedded local Ray)")
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
        cal = write_recognition(index_dir, args.clusters, RecognitionConfig(
            k=args.k, power=args.power, confidence=args.confidence, target=args.target), crops_model=model)
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


def add_recognize_command(sub) -> None:
    p = sub.add_parser("recognize", help="pseudo-landmark of query images by a kNN vote over the clusters, "
                                         "'unknown' below a threshold calibrated without labels")
    p.add_argument("images", nargs="*", help="query images to recognise")
    p.add_argument("--index", default="runs/index", help="index directory from `raytrieval index build`")
    p.add_argument("--clusters", default=None,
                   help="clusters.parquet of the clean stage: calibrate on it and write <index>/recognition.json")
    p.add_argument("--k", type=int, default=10, help="neighbours that vote")
    p.add_argument("--power", type=float, default=1.0, help="vote weight = similarity ** power")
    p.add_argument("--confidence", default="mass", choices=("mass", "share"),
                   help="winning vote mass over k (mass) or over all k neighbours' mass (share)")
    p.add_argument("--target", type=float, default=0.9, help="pseudo-precision the threshold must reach")
    p.add_argument("--crops", action="store_true",
                   help="calibrate on the clustered images cropped to their cluster boxes (re-embedded; for queries "
                        "that show only the landmark) instead of the indexed vectors")
    p.add_argument("--checkpoint", default=None, help="query model (default: the model the index was built with)")
    p.set_defaults(func=cmd_recognize)


def cmd_regions(args: argparse.Namespace) -> int:
    from raytrieval.cluster.runtime import init_ray
    from raytrieval.retrieval.manifest import ok_images, read_manifest
    from raytrieval.retrieval.regions import write_regions
    from raytrieval.retrieval.rpn import collection_regions, load_proposal_net
    from raytrieval.trainers.rpn import RpnConfig, backbone_model, fit_rpn

    run = Path(args.run_dir)
    for name in ("images.parquet", "clusters.parquet"):
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run / name} does not exist: run `raytrieval clean --run-dir {run}` first")
    cfg = RpnConfig(manifest=str(run / "images.parquet"), clusters=str(run / "clusters.parquet"), model=args.checkpoint,
                    image_size=args.image_size, epochs=args.epochs, proposals=args.proposals, workers=args.workers,
                    out=str(run), name="rpn")
    init_ray(args.address, log_file=run / "ray.log")
    final = fit_rpn(cfg)
    print(f"[regions] proposal head trained on the clean stage's boxes -> {final}", flush=True)
    table = ok_images(read_manifest(run / "images.parquet"))
    regions = collection_regions(backbone_model(cfg), load_proposal_net(final), table.column("image_id").to_pylist(),
                                 table.column("uri").to_pylist())
    out = write_regions(regions, run / "regions.parquet")
    print(f"[regions] {regions.num_rows} proposals of {table.num_rows} images -> {out} (for `eval --rerank casr "
          f"--regions {out}`)", flush=True)
    return 0


def add_regions_command(sub) -> None:
    p = sub.add_parser("regions", help="learned region proposals: an RPN head trained (Ray Train) on the clean "
                                       "stage's verified boxes, then regions.parquet of the whole collection")
    p.add_argument("--run-dir", required=True, help="run directory with images.parquet and clusters.parquet")
    p.add_argument("--checkpoint", default=None, help="retrieval checkpoint whose backbone carries the head "
                                                      "(default: the off-the-shelf backbone)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--image-size", type=int, default=512, help="side of the square training images")
    p.add_argument("--proposals", type=int, default=50, help="proposals kept per image")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else embedded)")
    p.set_defaults(func=cmd_regions)


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

    overrides = set_overrides(args.set)
    overrides.update({k: v for k, v in {
        "workers": args.workers, "epochs": args.epochs, "out": args.out, "name": args.name,
        "address": args.address, "tracking_uri": args.tracking_uri, "use_gpu": True if args.gpus else None,
    }.items() if v is not None})
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


def add_train_command(sub) -> None:
    p = sub.add_parser("train", help="fine-tune on mined tuples with Ray Train (siamese / triplet), tracked in MLflow")
    p.add_argument("--config", default=None, help="YAML file of TrainConfig fields (e.g. configs/train.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config field (YAML value)")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (DDP ranks)")
    p.add_argument("--gpus", action="store_true", help="one GPU per worker (NCCL, mixed precision)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out", default=None, help="run directory root (Ray storage, MLflow database)")
    p.add_argument("--name", default=None, help="run name; an existing name is resumed")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///<out>/mlflow.db)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or embedded local Ray)")
    p.set_defaults(func=cmd_train)


def cmd_tune(args: argparse.Namespace) -> int:
    from raytrieval.cluster.runtime import init_ray
    from raytrieval.trainers.sweep import run_sweep
    from raytrieval.trainers.sweep_config import SweepConfig
    from raytrieval.trainers.sweep_report import markdown_table

    overrides = {k: v for k, v in {
        "out": args.out, "name": args.name, "address": args.address, "tracking_uri": args.tracking_uri,
        "num_samples": args.num_samples, "searcher": args.searcher, "max_concurrent_trials": args.max_concurrent,
    }.items() if v is not None}
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


def add_tune_command(sub) -> None:
    p = sub.add_parser("tune", help="Ray Tune sweep of fine-tuning runs (ASHA on validation mAP), tracked in MLflow")
    p.add_argument("--config", required=True, help="YAML of SweepConfig fields (e.g. configs/tune.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field of the base train config")
    p.add_argument("--searcher", choices=("grid", "random", "tpe"), default=None)
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: what the cluster fits)")
    p.add_argument("--out", default=None)
    p.add_argument("--name", default=None, help="sweep name; an interrupted sweep of this name is resumed")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///<out>/mlflow.db)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or embedded local Ray)")
    p.set_defaults(func=cmd_tune)


def cmd_pipeline(args: argparse.Namespace) -> int:
    from raytrieval.cluster.pipeline import Pipeline, PipelineConfig, example_query, headline_table
    from raytrieval.cluster.runtime import serve_until_stopped

    overrides = {"run_dir": args.run_dir, "workers": args.workers, "address": args.address, "port": args.port,
                 "serve": False if args.no_serve else None, "collection": args.images}
    cfg = PipelineConfig.from_yaml(args.config, **overrides) if args.config else PipelineConfig(
        **{k: v for k, v in overrides.items() if v is not None})
    import dataclasses

    if args.images:  # a bare folder: no benchmark unless one is named (it only scores)
        run_dir = args.run_dir or (cfg.run_dir if args.config else f"runs/pipeline/{Path(args.images).resolve().name}")
        cfg = dataclasses.replace(cfg, benchmark=args.benchmark, run_dir=run_dir)
    elif args.benchmark:
        cfg = dataclasses.replace(cfg, benchmark=args.benchmark)
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


def add_pipeline_command(sub) -> None:
    p = sub.add_parser("pipeline", help="ingest -> clean -> split -> mine -> train -> select -> [evaluate] -> index "
                                        "-> report -> serve")
    p.add_argument("--config", default=None, help="YAML of PipelineConfig fields (default: the embedded demo)")
    p.add_argument("--images", default=None, help="a folder of your photos (no ground truth needed); every decision "
                                                  "is taken on the label-free self-mAP")
    p.add_argument("--benchmark", default=None, help="also score on this benchmark (it never chooses anything)")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--no-serve", action="store_true", help="stop after the report instead of serving")
    p.add_argument("--address", default=None, help="Ray cluster address (default: embedded local Ray)")
    p.set_defaults(func=cmd_pipeline)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raytrieval", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="mAP of a model on a benchmark (revisitop protocol)")
    p.add_argument("--dataset", default="demo", help="rparis6k-mini | ukbench-56 | demo | <name in data-root>")
    p.add_argument("--data-root", default="runs/data")
    p.add_argument("--checkpoint", default=None, help="evaluate this checkpoint directory")
    p.add_argument("--out", default=None, help="output directory (default runs/eval/<dataset>-<model>)")
    p.add_argument("--regions", default=None,
                   help="regions.parquet of learned proposals for --rerank casr (default: grid proposals)")
    add_model_args(p)
    add_rerank_args(p)
    add_ray_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="generate the embedded demo collection")
    p.add_argument("--out", default="runs/data")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("ingest", help="decode-check a folder of images into images.parquet")
    p.add_argument("source", help="image folder")
    p.add_argument("--out", default="runs/ingest/images.parquet")
    p.set_defaults(func=cmd_ingest)

    add_clean_command(sub)
    add_mine_command(sub)
    add_index_command(sub)
    add_serve_command(sub)
    add_recognize_command(sub)
    add_regions_command(sub)
    add_train_command(sub)
    add_tune_command(sub)
    add_pipeline_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    apply_offline_env()
    args = build_parser().parse_args(argv)
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
