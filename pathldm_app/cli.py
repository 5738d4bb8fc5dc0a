"""``pathldm-app``: start the local web app (generate, summary review, reader study)."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ldm.argtypes import float_in, int_in, positive_int, seed_int

logger = logging.getLogger("pathldm_app")

EXAMPLES = """examples:
  pathldm-app --ckpt logs/RUN --store data/test.h5 --generated samples/test \\
      --reports TCGA_Reports.csv --summaries summaries.jsonl
  PATHLDM_APP_TOKEN=secret pathldm-app --host 0.0.0.0 --ckpt logs/RUN ...
Open http://127.0.0.1:8000 and enter your name. Answers and reviews are kept in
WORKDIR/app.sqlite; restarting with the same arguments resumes every reader.
"""


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(prog="pathldm-app", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("generate")
    g.add_argument("--ckpt", default=None, help="checkpoint (.ckpt) or run directory logs/<run>/")
    g.add_argument("--config", nargs="+", default=None, help="model config YAML(s) if needed")
    g.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                   help="EMA or raw weights (auto: EMA when the checkpoint has them)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--batch-size", type=positive_int, default=4,
                   help="images per batch (default: 4)")
    d = p.add_argument_group("data")
    d.add_argument("--store", type=Path, default=None,
                   help="split store (.h5): real images of the study, slide summaries to pick")
    d.add_argument("--generated", type=Path, default=None,
                   help="folder of generated images (scripts/sample.py output) for the study")
    d.add_argument("--reports", type=Path, default=None, help="reports CSV or folder of .txt")
    d.add_argument("--summaries", type=Path, default=None, help="summaries JSONL to review")
    s = p.add_argument_group("study and review")
    s.add_argument("--study-n", type=positive_int, default=20,
                   help="real and as many synthetic images (per stratum with --stratify)")
    s.add_argument("--study-seed", type=seed_int, default=0, help="seed of the study plan")
    s.add_argument("--stratify", action="store_true", help="balance per tumor/TIL stratum")
    s.add_argument("--review-fraction", type=float_in(0.0, 1.0, lo_open=True), default=0.05,
                   help="share of reports to review (default: 0.05)")
    s.add_argument("--review-seed", type=seed_int, default=0, help="seed of the review sample")
    w = p.add_argument_group("server")
    w.add_argument("--workdir", type=Path, default=Path("outputs/app"),
                   help="database and generated jobs (default: outputs/app)")
    w.add_argument("--db", type=Path, default=None,
                   help="SQLite file (default: WORKDIR/app.sqlite)")
    w.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    w.add_argument("--port", type=int_in(0, 65535), default=8000, help="port (default: 8000)")
    w.add_argument("--token", default=os.environ.get("PATHLDM_APP_TOKEN"),
                   help="access token readers must enter (default: $PATHLDM_APP_TOKEN); "
                        "required for a non-loopback --host")
    w.add_argument("--export-study", type=Path, default=None, metavar="JSON",
                   help="write the reader study's statistics from the database and exit")
    w.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The settings recorded with every answer, review and job."""
    def path(p: Path | None) -> str | None:
        return None if p is None else str(p.resolve())

    return {"ckpt": args.ckpt and str(Path(args.ckpt).resolve()), "config": args.config,
            "weights": args.weights, "store": path(args.store), "generated": path(args.generated),
            "reports": path(args.reports), "summaries": path(args.summaries),
            "study_n": args.study_n, "study_seed": args.study_seed, "stratify": args.stratify,
            "review_fraction": args.review_fraction, "review_seed": args.review_seed}


def slide_summaries(store: Path) -> list[dict[str, str]]:
    """``{"slide", "summary"}`` choices of a split store for the generate form."""
    from ldm.evaluation.images import SplitStore

    st = SplitStore(store)
    slides = st.array("slides")
    return [{"slide": str(slides[i]), "summary": text}
            for i, texts in enumerate(st.slide_summaries()) for text in texts]


def build_state(args: argparse.Namespace) -> Any:
    """Database, study plan, review sample and generator from the arguments."""
    from pathldm_app.generate import Generator, ModelSpec
    from pathldm_app.review import ReviewSet
    from pathldm_app.storage import Database
    from pathldm_app.study import ImageSource, StudyConfig, build_plan
    from pathldm_app.web import AppState

    db = Database(args.db or args.workdir / "app.sqlite")
    settings = settings_of(args)
    st = AppState(db=db, settings=settings, settings_id=db.settings_id(settings), token=args.token)
    if args.store is not None:
        st.slide_summaries = slide_summaries(args.store)
    if args.generated is not None and args.store is None:
        raise ValueError("the reader study needs --store (real images) with --generated")
    if args.generated is not None:
        st.study = StudyConfig(args.store, args.generated, args.study_n, args.study_seed,
                               args.stratify)
        if db.get_meta("study") is None:
            db.init_study(st.study.key(), build_plan(st.study))
        else:
            db.init_study(st.study.key(), [])  # checks the stored plan's settings
        st.study_items = db.study_items()
        st.images = ImageSource(st.study)
    if (args.reports is None) != (args.summaries is None):
        raise ValueError("summary review needs both --reports and --summaries")
    if args.reports is not None:
        st.reviews = ReviewSet(args.reports, args.summaries, args.review_fraction,
                               args.review_seed)
    if args.ckpt is not None:
        spec = ModelSpec(args.ckpt, args.config, args.weights, args.device, args.batch_size)
        st.generator = Generator(db, spec, args.workdir / "generated", st.settings_id)
    return st


def export_study(db_path: Path, out: Path) -> dict[str, Any]:
    """Write the study statistics of an existing database as JSON."""
    from ldm.evaluation.images import write_json
    from pathldm_app.storage import Database
    from pathldm_app.study import study_report

    if not db_path.is_file():
        raise FileNotFoundError(f"app database not found: {db_path}")
    report = study_report(Database(db_path))
    write_json(report, out)
    logger.info("%d answers of %d readers -> %s", report["answers"], len(report["readers"]), out)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.export_study is not None:
        try:
            export_study(args.db or args.workdir / "app.sqlite", args.export_study)
        except (OSError, ValueError) as e:
            logger.error("%s", e)
            return 1
        return 0
    if not is_loopback(args.host) and not args.token:
        logger.error("refusing to listen on %s without an access token: set --token or "
                     "PATHLDM_APP_TOKEN (or use --host 127.0.0.1)", args.host)
        return 2
    if args.batch_size < 1 or args.study_n < 1:
        logger.error("--batch-size and --study-n must be positive")
        return 2
    from ldm.optional import MissingExtraError, require

    try:
        for module in ("fastapi", "uvicorn", "jinja2", "multipart"):
            require(module, "app", "The web app")
    except MissingExtraError as e:
        logger.error("%s", e)
        return 2
    import uvicorn

    from pathldm_app.web import create_app
    try:
        state = build_state(args)
    except (FileNotFoundError, KeyError, ValueError, OSError, RuntimeError) as e:
        logger.error("%s: %s", type(e).__name__, e)
        return 1
    if state.generator is not None:
        state.generator.start()
    logger.info("PathLDM app on http://%s:%d (study: %d items, review: %d summaries)",
                args.host, args.port, len(state.study_items),
                len(state.reviews) if state.reviews else 0)
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
