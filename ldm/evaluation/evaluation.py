"""One evaluation run (scripts/evaluate.py): features, metrics, memorisation, adherence, report."""
from __future__ import annotations

import argparse
import gc
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ldm.evaluation import memorisation as mem
from ldm.evaluation import report
from ldm.evaluation.features import (
    Extractor,
    embed_texts,
    extract,
    file_tag,
    load_extractor,
)
from ldm.evaluation.images import pil_transform, write_json, write_text
from ldm.evaluation.metrics import all_metrics
from ldm.evaluation.prompt_adherence import probe_adherence, text_image_similarity
from ldm.evaluation.protocol import (
    PROTOCOL_KEYS,
    check_protocol,
    file_meta,
    image_protocol,
    load_features,
    package_versions,
    save_features,
)
from ldm.evaluation.sources import ImageSet, open_image_set

logger = logging.getLogger(__name__)

HELD_OUT_FRACTION = 0.2
# the real image sets (sample-set labels must differ)
REFERENCE, TRAIN = "real-reference", "real-train"


def stratum_of(levels: Any) -> str | None:
    """``"<tumor> tumor / <til> TIL"`` of a level pair, None when unknown."""
    return None if levels is None else f"{levels[0]} tumor / {levels[1]} TIL"


class Evaluation:
    """Holds the settings, the saved features per (set, extractor) and the results."""

    def __init__(self, args: argparse.Namespace, sources: dict[str, Path | None],
                 sample_sets: list[str], device: Any) -> None:
        self.args, self.sources, self.sample_sets, self.device = args, sources, sample_sets, device
        self.protocol = image_protocol(args.center_crop, args.resize, args.n, args.seed)
        self.transform = pil_transform(args.center_crop, args.resize)
        self.images: dict[str, ImageSet] = {}
        self.features: dict[tuple[str, str], dict[str, Any]] = {}
        self.flags: list[str] = []

    # ------------------------------------------------------------------------- features
    def feature_path(self, name: str, spec: str) -> Path:
        """Where the features of set ``name`` in extractor ``spec`` are saved."""
        return self.args.out / "features" / name / f"features_{file_tag(spec)}.npz"

    def image_set(self, name: str) -> ImageSet:
        """The images of set ``name`` (opened once)."""
        if name not in self.images:
            path = self.sources[name]
            if path is None:
                raise ValueError(f"set {name!r}: no images given and no saved features")
            n = self.args.train_n if name == TRAIN else self.args.n
            self.images[name] = open_image_set(path, n=n, seed=self.args.seed,
                                               transform=self.transform)
        return self.images[name]

    def _given_reference(self, spec: str) -> Path | None:
        for path in self.args.reference_features:
            if load_features(path)["meta"].get("extractor") == spec:
                return path
        return None

    def _saved(self, name: str, spec: str, ext: Extractor | None) -> dict[str, Any] | None:
        given = self._given_reference(spec) if name == REFERENCE else None
        path = given or self.feature_path(name, spec)
        if not path.is_file():
            return None
        data = load_features(path)
        expected = {"extractor": spec, "center_crop": self.args.center_crop,
                    "resize": self.args.resize}
        if ext is not None:
            expected["weights_sha256"] = ext.provenance["weights_sha256"]
        # a given reference file must also be the requested subset; our own saved features
        # are recomputed below when the set's images differ
        keys = PROTOCOL_KEYS + (("n_requested", "seed") if given and self.args.n else ())
        check_protocol(data["meta"], {**expected, "n_requested": self.args.n,
                                      "seed": self.args.seed}, path, keys)
        source = self.sources.get(name)
        if given is None and source is not None:
            wanted = str(Path(source).resolve())
            if data["meta"]["images"]["path"] != wanted:
                raise ValueError(f"{path}: features of {data['meta']['images']['path']}, not "
                                 f"of {wanted}; use another --out or label")
            if not self.args.features_only and self.image_set(name).names != data["names"]:
                logger.warning("%s: the images of %s changed since; recomputing", path, name)
                return None
        logger.info("%s/%s: using saved features %s", name, spec, path)
        return data

    def compute(self, name: str, ext: Extractor) -> dict[str, Any]:
        """Extract, save and return the features of set ``name``."""
        images = self.image_set(name)
        feats = extract(ext, images.load, len(images), self.args.batch_size,
                        self.args.num_workers, desc=f"{name} {ext.spec}")
        text = None
        if ext.encode_text is not None and all(c is not None for c in images.captions):
            text = embed_texts(ext, images.captions)
        info = {"path": str(images.path.resolve()), "kind": images.kind, "n": len(images),
                "sha256": images.content_hash(), "formats": images.format_counts()}
        meta = file_meta(ext.provenance, self.protocol, info)
        path = save_features(self.feature_path(name, ext.spec), feats, images.names, meta,
                             text, images.captions, images.levels)
        logger.info("wrote %s (%d x %d)", path, *feats.shape)
        return load_features(path)

    def load_all(self) -> None:
        """Features of every set in every extractor: saved ones, else computed."""
        for spec in self.extractors():
            ext = None
            for name in self.sources:
                data = self._saved(name, spec, ext)
                if data is None and ext is None and not self.args.features_only:
                    ext = load_extractor(spec, self.device, self.args.inception_weights,
                                         self.args.allow_download)
                    data = self._saved(name, spec, ext)
                if data is None:
                    if self.args.features_only:
                        raise FileNotFoundError(
                            f"--features-only: no saved features {self.feature_path(name, spec)}"
                            "; run once without --features-only")
                    data = self.compute(name, ext)
                self.features[(name, spec)] = data
            self._check_same_weights(spec)
            del ext
            gc.collect()

    def _check_same_weights(self, spec: str) -> None:
        """Every set's features in ``spec`` come from the same weights as the reference's."""
        ref = self.features[(REFERENCE, spec)]
        for name in self.sources:
            data = self.features[(name, spec)]
            check_protocol(data["meta"], {"weights_sha256": ref["meta"]["weights_sha256"]},
                           data["path"], ("weights_sha256",))

    def extractors(self) -> list[str]:
        """--extractor plus an explicit --text-extractor."""
        specs = list(dict.fromkeys(self.args.extractor))
        if self.args.text_extractor not in ("auto", "none") and \
                self.args.text_extractor not in specs:
            specs.append(self.args.text_extractor)
        return specs

    # -------------------------------------------------------------------------- metrics
    def _metrics(self, real: np.ndarray, fake: np.ndarray) -> dict[str, Any]:
        a = self.args
        return all_metrics(real, fake, nearest_k=a.k, kid_subsets=a.kid_subsets,
                           kid_subset_size=a.kid_subset_size, seed=a.seed)

    def set_metrics(self, name: str, spec: str) -> dict[str, Any]:
        """Overall and per-stratum metrics of sample set ``name`` against the reference."""
        ref, fake = self.features[(REFERENCE, spec)], self.features[(name, spec)]
        out: dict[str, Any] = {"overall": self._metrics(ref["features"], fake["features"]),
                               "strata": {}}
        ref_strata = np.array([stratum_of(lv) for lv in ref["levels"]], dtype=object)
        fake_strata = np.array([stratum_of(lv) for lv in fake["levels"]], dtype=object)
        for stratum in sorted({s for s in fake_strata if s is not None}):
            r, f = ref_strata == stratum, fake_strata == stratum
            entry: dict[str, Any] = {"n_real": int(r.sum()), "n_fake": int(f.sum())}
            if min(r.sum(), f.sum()) >= max(self.args.min_stratum, self.args.k + 1):
                entry = self._metrics(ref["features"][r], fake["features"][f])
            out["strata"][stratum] = entry
        return out

    def memorisation(self, spec: str) -> dict[str, Any]:
        """Memorisation of every sample set against the training features."""
        train = self.features[(self.train_name(), spec)]
        out = {}
        for name in self.sample_sets:
            fake = self.features[(name, spec)]
            res = mem.memorisation(fake["features"], train["features"],
                                   self.args.memorisation_percentile)
            out[name] = mem.summary(res, fake["names"], train["names"])
        return out

    def same_real_sets(self, spec: str) -> bool:
        """Whether the training features come from the reference's images (no held-out reals)."""
        train = self.features[(self.train_name(), spec)]["meta"]["images"]["path"]
        return train == self.features[(REFERENCE, spec)]["meta"]["images"]["path"]

    def train_name(self) -> str:
        """The set that stands for the training split."""
        return TRAIN if TRAIN in self.sources else REFERENCE

    def probe(self, spec: str) -> dict[str, Any]:
        """Linear tumor/TIL probe: train split -> held-out real patches and each sample set."""
        train = self.features[(self.train_name(), spec)]
        x, levels = train["features"], train["levels"]
        if self.same_real_sets(spec):  # hold out a seeded part of the one real set
            rng = np.random.default_rng(self.args.seed)
            ho = np.zeros(len(x), dtype=bool)
            ho[rng.choice(len(x), max(1, int(HELD_OUT_FRACTION * len(x))), replace=False)] = True
            tr_x, tr_lv = x[~ho], [lv for lv, h in zip(levels, ho) if not h]
            ho_x, ho_lv = x[ho], [lv for lv, h in zip(levels, ho) if h]
        else:
            ref = self.features[(REFERENCE, spec)]
            tr_x, tr_lv, ho_x, ho_lv = x, levels, ref["features"], ref["levels"]
        return {name: probe_adherence(tr_x, tr_lv, ho_x, ho_lv, self.features[(name, spec)]
                                      ["features"], self.features[(name, spec)]["levels"])
                for name in self.sample_sets}

    def text_image(self) -> dict[str, Any] | None:
        """PLIP-style text-image similarity of every set that has caption embeddings."""
        spec = self.args.text_extractor
        if spec == "none":
            return None
        if spec == "auto":
            spec = next((s for s in self.extractors()
                         if self.features[(REFERENCE, s)]["text_features"] is not None
                         or any(self.features[(n, s)]["text_features"] is not None
                                for n in self.sample_sets)), None)
            if spec is None:
                return None
        sets = {}
        for name in [*self.sample_sets, REFERENCE]:
            data = self.features[(name, spec)]
            if data["text_features"] is not None:
                sets[name] = text_image_similarity(data["features"], data["text_features"],
                                                   seed=self.args.seed)
        return {"extractor": spec, "sets": sets} if sets else None

    # --------------------------------------------------------------------------- report
    def check_formats(self) -> None:
        """Flag sample sets stored as JPEG (lossy: JPEG vs PNG alone moves FID)."""
        for name in self.sample_sets:
            data = self.features[(name, self.extractors()[0])]
            formats = data["meta"]["images"].get("formats", {})
            if formats.get("JPEG"):
                msg = (f"sample set {name!r}: {formats['JPEG']} of {sum(formats.values())} "
                       "images are JPEG; JPEG compression alone moves FID, save samples as PNG "
                       "for comparable numbers")
                logger.warning(msg)
                self.flags.append(msg)

    def run(self, infos: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Everything; writes results.json, report.md and the plots into --out."""
        out = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        self.load_all()
        self.check_formats()
        specs = self.extractors()
        results: dict[str, Any] = {
            "protocol": self.recorded_protocol(specs),
            "settings": {"nearest_k": self.args.k, "kid_subsets": self.args.kid_subsets,
                         "kid_subset_size": self.args.kid_subset_size,
                         "memorisation_percentile": self.args.memorisation_percentile},
            "sample_sets": {n: {**infos.get(n, {}), **self.set_record(n, specs[0])}
                            for n in self.sample_sets},
            "flags": self.flags,
            "metrics": {s: {n: self.set_metrics(n, s) for n in self.sample_sets} for s in specs},
            "memorisation": {s: self.memorisation(s) for s in specs},
            "probe": {s: self.probe(s) for s in specs},
            "text_image": self.text_image()}
        plots = self.plots(results)
        results["plots"] = [str(p.name) for p in plots]
        write_json(results, out / "results.json")
        results["report"] = str(out / "report.md")
        write_text(report.markdown(results, plots), out / "report.md")
        logger.info("wrote %s, %s and %d plots", out / "results.json", out / "report.md",
                    len(plots))
        return results

    def set_record(self, name: str, spec: str) -> dict[str, Any]:
        """Path, n, hash and formats of a set, from its feature file."""
        meta = self.features[(name, spec)]["meta"]["images"]
        return {k: meta.get(k) for k in ("path", "kind", "n", "sha256", "formats")}

    def recorded_protocol(self, specs: list[str]) -> dict[str, Any]:
        """The protocol of this run, as the results JSON records it."""
        ext = {s: self.features[(REFERENCE, s)]["meta"]["extractor_provenance"] for s in specs}
        proto = {**self.protocol, "image_format_expected": "PNG",
                 "reference": self.set_record(REFERENCE, specs[0]),
                 "extractors": ext, "packages": package_versions()}
        if TRAIN in self.sources:
            proto["train"] = self.set_record(TRAIN, specs[0])
        return proto

    def plots(self, results: dict[str, Any]) -> list[Path]:
        """Precision/recall, strata, guidance and nearest-neighbour PNGs."""
        out = self.args.out
        plots = [report.plot_precision_recall(results, out / "precision_recall.png")]
        if any(m["strata"] for per_set in results["metrics"].values() for m in per_set.values()):
            plots.append(report.plot_strata(results, out / "strata_fd.png"))
        sweep = json.loads(self.args.sweep.read_text()) if self.args.sweep else None
        g = report.plot_guidance(report.guidance_points(results, sweep), out / "guidance.png")
        plots += [g] if g else []
        pairs = self.nn_pairs(results)
        if pairs:
            plots.append(report.nn_pairs_image(pairs, out / "nearest_neighbours.png"))
        return plots

    def nn_pairs(self, results: dict[str, Any]) -> list[tuple[Any, Any]]:
        """Images of the closest sample/training pairs of the first extractor and set."""
        if self.args.features_only:
            return []
        spec, name = self.extractors()[0], self.sample_sets[0]
        fake, train = self.image_set(name), self.image_set(self.train_name())
        index = {n: i for i, n in enumerate(train.names)}
        findex = {n: i for i, n in enumerate(fake.names)}
        return [(fake.load(findex[p["sample"]]), train.load(index[p["train"]]))
                for p in results["memorisation"][spec][name]["closest_pairs"]]
