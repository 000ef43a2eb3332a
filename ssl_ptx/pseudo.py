"""Pseudo labels for external X-rays: keep the images where a model and the dataset agree.

The 3rd place (bestfitting) labelled CheXpert with a model trained on SIIM and kept an image
only when the model and the dataset's own label agreed. Here that procedure is split into
swappable pieces:

* **rules** decide one image from its dataset label and the model's probability map
  (float32 H×W at the filter's working size). The first rule that claims a label decides;
  a label no rule claims (uncertain ``-1``, blank ``NaN``) is dropped.

  - :class:`PositiveAgreementRule` (published): a label-1 image is kept when more than
    ``min_area`` pixels have probability above ``threshold``; that prediction is its mask.
    ``min_area`` is given at 1024² (3rd place: 100 px at 0.5) and scaled by the map's area,
    ``min_area · H·W / 1024²`` (:func:`scaled_min_area`).
  - :class:`NegativeRule` (published: every label-0 image is an empty-mask negative), with
    ``require_agreement=True`` (extension) a label-0 image is kept only when the model
    predicts at most ``max_area`` (scaled the same way) pixels above ``threshold``.
* :class:`ConfidenceBand` (extension): pixels of a kept image whose probability lies in
  ``[low, high)`` are marked to be ignored by the loss (an ``ignore_rle`` column and an
  ``ignore`` mask) instead of being called background.
* ``soft=True`` (the 10th place's soft pseudo labels): a kept image whose map the rule looked
  at also keeps that map, quantised to ``uint8`` ``round(255·p)`` at native size, as its
  training target; the manifest marks those rows (``soft`` True, ``soft_masks`` the
  ``masks.h5`` holding them) and :func:`ssl_ptx.engine.pseudo_data.build_pseudo_datasets`
  serves them as float targets (train with ``loss.name=soft_bce``). The binary mask and
  label stay as without ``soft``.
* :class:`PseudoLabelFilter` runs a :class:`~ssl_ptx.inference.Predictor` (a model or an
  ensemble, with flip TTA and lung crop when configured) over an external manifest
  (``external_data.chexpert`` frontal images, ``external_data.nih``) in batches with a
  progress bar and writes, in ``out_dir``:

  ============================  ===========================================================
  ``pseudo_manifest.csv``       the kept images, the standard manifest columns
                                (:mod:`ssl_ptx.data.manifest`): ``source`` "pseudo",
                                ``label`` the pseudo label, ``rle`` the pseudo mask at the
                                image's native size (``-1`` for negatives), ``mask_area``;
                                extra ``origin`` (chexpert, nih…), ``origin_label``,
                                ``pred_area`` (pixels at the working size), ``ignore_rle``,
                                ``soft`` (a soft map is stored), ``soft_masks``
  ``decisions.csv``             every input row: decision (kept / dropped), reason, areas
  ``masks.h5``                  the kept masks at native size (``masks/<n>`` bit-packed
                                rows, ``image_ids``, ``shapes``; ``ignore/<n>`` with a band;
                                ``soft/<n>`` uint8 probability maps with ``soft``)
  ``skipped.csv``               images that could not be read: ``image_id, path, error``
  ``audit.json``                counts per source × label × decision and per reason
  ``area_histogram.png``        predicted lesion areas of label-1 images, kept and dropped
  ``gallery.png``               kept and dropped images with the mask outlined
  ============================  ===========================================================

  The run is resumable: rows are processed in blocks of ``chunk``, each written atomically to
  ``out_dir/parts/``; a rerun with the same manifest and settings skips finished blocks, so
  an interrupted run neither loses nor duplicates rows. Outputs appear once all blocks are
  done.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ssl_ptx.data import rle
from ssl_ptx.data.images import read_image, resize_image, resize_mask
from ssl_ptx.data.manifest import MANIFEST_COLUMNS, validate_manifest
from ssl_ptx.fileio import atomic_path, atomic_write_bytes
from ssl_ptx.inference import Predictor
from ssl_ptx.postprocess import quantise
from ssl_ptx.viz import contact_sheet, write_png

__all__ = [
    "REFERENCE_SIDE",
    "ConfidenceBand",
    "Decision",
    "FilterResult",
    "NegativeRule",
    "PositiveAgreementRule",
    "PseudoLabelFilter",
    "PseudoRule",
    "SoftMaps",
    "PSEUDO_MANIFEST_NAME",
    "published_rules",
    "read_pseudo_manifest",
    "read_pseudo_masks",
    "scaled_min_area",
]

logger = logging.getLogger(__name__)

#: the side at which ``min_area`` / ``max_area`` are stated (the SIIM images' 1024²)
REFERENCE_SIDE = 1024
#: the filter's table of kept images in its output folder
PSEUDO_MANIFEST_NAME = "pseudo_manifest.csv"
_PARTS = "parts"
_BUILD_INFO = "build.json"
_DECISION_COLUMNS = [
    "image_id",
    "origin",
    "origin_label",
    "decision",
    "reason",
    "pseudo_label",
    "pred_area",
    "min_area",
    "max_probability",
    "height",
    "width",
]


def scaled_min_area(
    min_area: float, shape: tuple[int, int], reference: int = REFERENCE_SIDE
) -> float:
    """``min_area`` pixels stated at ``reference``² scaled to a map of ``shape`` (H, W):
    ``min_area · H·W / reference²`` (100 px at 1024² is 1.5625 px at 128²)."""
    return float(min_area) * shape[0] * shape[1] / float(reference) ** 2


@dataclass(frozen=True)
class Decision:
    """What a rule decided for one image.

    Attributes:
        keep: the image enters the pseudo set.
        pseudo_label: 1.0 or 0.0 when kept, NaN when dropped.
        reason: a short word for the audit ("model_agrees", "too_small", "negative", …).
        mask: uint8 H×W 0/1 pseudo mask at the map's size (all zero for negatives), or None
            when dropped.
        pred_area: pixels above the rule's threshold in the map (-1 when no map was needed).
        min_area: the area bound the rule applied at this size (NaN when none).
    """

    keep: bool
    pseudo_label: float
    reason: str
    mask: np.ndarray | None = None
    pred_area: int = -1
    min_area: float = math.nan


class PseudoRule(abc.ABC):
    """Decides the images of the dataset labels it :meth:`claims`."""

    @abc.abstractmethod
    def claims(self, label: float) -> bool:
        """True when this rule decides images with dataset label ``label``."""

    @abc.abstractmethod
    def needs_prediction(self, label: float) -> bool:
        """True when :meth:`decide` looks at the model's map for this label (images it
        does not need are not run through the model)."""

    @abc.abstractmethod
    def decide(self, label: float, probability: np.ndarray | None) -> Decision:
        """Decide one image from its label and float32 H×W map (None when not needed)."""


def _check_threshold(threshold: float) -> float:
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    return float(threshold)


@dataclass(frozen=True)
class PositiveAgreementRule(PseudoRule):
    """Label-1 images: keep when more than ``min_area`` (at 1024², scaled) pixels have
    probability above ``threshold``; the mask is that prediction. 3rd place: 100 px, 0.5."""

    threshold: float = 0.5
    min_area: float = 100.0

    def __post_init__(self) -> None:
        _check_threshold(self.threshold)
        if self.min_area < 0:
            raise ValueError(f"min_area must be >= 0, got {self.min_area}")

    def claims(self, label: float) -> bool:
        return label == 1.0

    def needs_prediction(self, label: float) -> bool:
        return True

    def decide(self, label: float, probability: np.ndarray | None) -> Decision:
        if probability is None:
            raise ValueError("PositiveAgreementRule needs the model's probability map")
        mask = (probability > self.threshold).astype(np.uint8)
        area = int(mask.sum())
        bound = scaled_min_area(self.min_area, probability.shape)
        if area > bound:
            return Decision(True, 1.0, "model_agrees", mask, area, bound)
        return Decision(False, math.nan, "model_too_small", None, area, bound)


@dataclass(frozen=True)
class NegativeRule(PseudoRule):
    """Label-0 images become empty-mask negatives. With ``require_agreement`` (an extension;
    the published code keeps every one) only those where the model predicts at most
    ``max_area`` (at 1024², scaled) pixels above ``threshold``."""

    require_agreement: bool = False
    threshold: float = 0.5
    max_area: float = 100.0

    def __post_init__(self) -> None:
        _check_threshold(self.threshold)
        if self.max_area < 0:
            raise ValueError(f"max_area must be >= 0, got {self.max_area}")

    def claims(self, label: float) -> bool:
        return label == 0.0

    def needs_prediction(self, label: float) -> bool:
        return self.require_agreement

    def decide(self, label: float, probability: np.ndarray | None) -> Decision:
        if not self.require_agreement:
            area = -1 if probability is None else int((probability > self.threshold).sum())
            empty = None if probability is None else np.zeros(probability.shape, np.uint8)
            return Decision(True, 0.0, "negative", empty, area)
        if probability is None:
            raise ValueError("NegativeRule(require_agreement=True) needs the probability map")
        area = int((probability > self.threshold).sum())
        bound = scaled_min_area(self.max_area, probability.shape)
        if area <= bound:
            return Decision(
                True, 0.0, "model_agrees", np.zeros_like(probability, np.uint8), area, bound
            )
        return Decision(False, math.nan, "model_finds_lesion", None, area, bound)


def published_rules(
    threshold: float = 0.5, min_area: float = 100.0, *, agree_on_negatives: bool = False
) -> list[PseudoRule]:
    """The 3rd place's rules (label-1 agreement, every label-0 a negative); with
    ``agree_on_negatives`` the negatives must agree too (at most ``min_area`` pixels)."""
    return [
        PositiveAgreementRule(threshold, min_area),
        NegativeRule(agree_on_negatives, threshold, min_area),
    ]


@dataclass(frozen=True)
class ConfidenceBand:
    """Pixels with probability in ``[low, high)`` are to be ignored by the loss (extension).

    The pseudo mask stays ``probability > threshold``; the band is stored beside it.
    """

    low: float = 0.3
    high: float = 0.7

    def __post_init__(self) -> None:
        if not 0.0 <= self.low < self.high <= 1.0:
            raise ValueError(f"need 0 <= low < high <= 1, got low={self.low}, high={self.high}")

    def ignore_mask(self, probability: np.ndarray) -> np.ndarray:
        """uint8 H×W: 1 where ``low <= probability < high``."""
        return ((probability >= self.low) & (probability < self.high)).astype(np.uint8)


@dataclass
class FilterResult:
    """What :meth:`PseudoLabelFilter.run` wrote and counted.

    Attributes:
        manifest: the pseudo manifest (kept images; ``pseudo_manifest.csv``).
        decisions: one row per input image (``decisions.csv``).
        skipped: unreadable images: ``image_id``, ``path``, ``error`` (``skipped.csv``).
        audit: the content of ``audit.json``.
        out_dir: the output folder.
        seconds: wall time of this call.
        images_per_second: images run through the model per second of model time in this
            call (reading excluded; NaN when none was predicted).
        blocks_reused: blocks finished by an earlier, interrupted run.
    """

    manifest: pd.DataFrame
    decisions: pd.DataFrame
    skipped: pd.DataFrame
    audit: dict[str, Any]
    out_dir: Path
    seconds: float = 0.0
    images_per_second: float = math.nan
    blocks_reused: int = 0


@dataclass
class _Block:
    """Decisions of one block, by position in the block."""

    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # kept, non-empty, native size
    ignore: dict[int, np.ndarray] = field(default_factory=dict)  # band, native size
    soft: dict[int, np.ndarray] = field(default_factory=dict)  # uint8 maps, native size
    dropped: dict[int, np.ndarray] = field(default_factory=dict)  # prediction, working size
    skipped: list[list[str]] = field(default_factory=list)
    predicted: int = 0
    predict_seconds: float = 0.0


def _label_name(label: float) -> str:
    if np.isnan(label):
        return "blank"
    return {1.0: "positive", 0.0: "negative", -1.0: "uncertain"}.get(float(label), str(label))


class PseudoLabelFilter:
    """Run a predictor over an external manifest and keep the images the rules accept.

    Args:
        predictor: a :class:`~ssl_ptx.inference.Predictor`; its ``predict_batch`` gets
            ``[B, 1, size, size]`` float images in 0..1 (its ensemble, TTA and lung crop
            apply).
        rules: the rules, first claim wins; default :func:`published_rules`.
        size: working side in pixels: images are resized to size² and the rules see maps at
            size²; default: the predictor's ``size``.
        band: a :class:`ConfidenceBand` marking pixels to ignore, or None.
        soft: also keep the probability map of every kept image whose map the rule looked
            at, as a soft training target (see the module docstring).
        batch_size: images per ``predict_batch`` call.
        chunk: input rows per part file (the unit of resumption).
        gallery_size: images per group (kept, dropped) in ``gallery.png``; 0 for no gallery.
        progress: show a progress bar.

    Raises:
        ValueError: no working size, or ``batch_size`` / ``chunk`` < 1.
    """

    def __init__(
        self,
        predictor: Predictor,
        rules: Sequence[PseudoRule] | None = None,
        *,
        size: int | None = None,
        band: ConfidenceBand | None = None,
        soft: bool = False,
        batch_size: int = 16,
        chunk: int = 256,
        gallery_size: int = 12,
        progress: bool = True,
    ) -> None:
        size = size if size is not None else predictor.size
        if size is None or size < 1:
            raise ValueError("PseudoLabelFilter needs a working size (size= or Predictor.size)")
        if batch_size < 1 or chunk < 1:
            raise ValueError(f"batch_size and chunk must be >= 1, got {batch_size}, {chunk}")
        self.predictor = predictor
        self.rules = list(rules) if rules is not None else published_rules()
        self.size = int(size)
        self.band = band
        self.soft = bool(soft)
        self.batch_size = int(batch_size)
        self.chunk = int(chunk)
        self.gallery_size = int(gallery_size)
        self.progress = progress

    def rule_for(self, label: float) -> PseudoRule | None:
        """The first rule that claims ``label``, or None (the image is dropped)."""
        return next((rule for rule in self.rules if rule.claims(label)), None)

    def settings(self) -> dict[str, Any]:
        """What decides the output besides the manifest (the resume fingerprint's part)."""
        return {
            "rules": [repr(rule) for rule in self.rules],
            "size": self.size,
            "band": repr(self.band),
            "soft": self.soft,
            "chunk": self.chunk,
            "predictor": repr(self.predictor),
        }

    # ------------------------------------------------------------------------------- run

    def run(self, manifest: pd.DataFrame, out_dir: str | os.PathLike) -> FilterResult:
        """Filter every row of ``manifest`` into ``out_dir`` (see the module docstring).

        Args:
            manifest: an external manifest (standard columns; e.g.
                ``external_data.chexpert.load(root)``, frontal images by default).
            out_dir: output folder; a rerun into it resumes an interrupted run.

        Returns:
            A :class:`FilterResult`.

        Raises:
            ValueError: an invalid manifest, or ``out_dir/parts`` left by a run with another
                manifest or settings (the message says to delete it).
        """
        started = time.perf_counter()
        manifest = validate_manifest(manifest, name="pseudo-label input").reset_index(drop=True)
        out_dir = Path(out_dir)
        parts_dir = out_dir / _PARTS
        self._prepare_parts(parts_dir, self._fingerprint(manifest))
        starts = range(0, len(manifest), self.chunk)
        part_paths = [parts_dir / f"part-{n:06d}.h5" for n in range(len(starts))]
        done = [path.is_file() for path in part_paths]
        rows_done = sum(
            min(self.chunk, len(manifest) - s) for s, d in zip(starts, done, strict=True) if d
        )
        predicted, predict_seconds = 0, 0.0
        bar = tqdm(
            total=len(manifest),
            initial=rows_done,
            desc="pseudo labels",
            unit="img",
            disable=not self.progress,
        )
        with bar:
            for start, path, finished in zip(starts, part_paths, done, strict=True):
                if finished:
                    continue
                block = self._decide(manifest.iloc[start : start + self.chunk])
                self._write_part(path, block)
                predicted += block.predicted
                predict_seconds += block.predict_seconds
                bar.update(min(self.chunk, len(manifest) - start))
        result = self._merge(manifest, part_paths, out_dir)
        shutil.rmtree(parts_dir)
        result.seconds = time.perf_counter() - started
        result.images_per_second = predicted / predict_seconds if predicted else math.nan
        result.blocks_reused = sum(done)
        logger.info(
            "pseudo labels: %d of %d images kept (%d positive), %d unreadable, in %s",
            len(result.manifest),
            len(manifest),
            int((result.manifest["label"] == 1.0).sum()),
            len(result.skipped),
            out_dir,
        )
        return result

    def _fingerprint(self, manifest: pd.DataFrame) -> str:
        columns = ["image_id", "path", "source", "label"]
        rows = pd.util.hash_pandas_object(manifest[columns].astype(str), index=False)
        digest = hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode())
        digest.update(rows.to_numpy().tobytes())
        return digest.hexdigest()

    @staticmethod
    def _prepare_parts(parts_dir: Path, fingerprint: str) -> None:
        info = parts_dir / _BUILD_INFO
        if info.is_file():
            if json.loads(info.read_text()).get("fingerprint") != fingerprint:
                raise ValueError(
                    f"{parts_dir} holds parts of a run with another manifest or other filter "
                    "settings; delete that folder to start over"
                )
            return
        parts_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(info, json.dumps({"fingerprint": fingerprint}).encode())

    def _predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """float32 [B, size, size] maps of uint8 native images."""
        batch = np.stack([resize_image(image, self.size) for image in images])
        tensor = torch.from_numpy(batch).float().div_(255.0).unsqueeze(1)
        return self.predictor.predict_batch(tensor).masks.numpy()

    def _decide(self, rows: pd.DataFrame) -> _Block:
        """Read, predict (where a rule needs it) and decide the rows of one block."""
        block = _Block()
        pending: list[tuple[int, PseudoRule, np.ndarray]] = []

        def flush() -> None:
            if not pending:
                return
            tick = time.perf_counter()
            maps = self._predict([image for _, _, image in pending])
            block.predict_seconds += time.perf_counter() - tick
            block.predicted += len(pending)
            for (position, rule, image), probability in zip(pending, maps, strict=True):
                self._apply(block, position, rule, image, probability)
            pending.clear()

        for position, row in enumerate(rows.to_dict("records")):
            label = float(row["label"])
            block.records[position] = {
                "image_id": str(row["image_id"]),
                "origin": str(row["source"]),
                "origin_label": label,
                "pseudo_label": math.nan,
                "pred_area": -1,
                "min_area": math.nan,
                "max_probability": math.nan,
                "height": int(row["height"]),
                "width": int(row["width"]),
            }
            rule = self.rule_for(label)
            if rule is None:
                block.records[position].update(
                    decision="dropped", reason=f"{_label_name(label)}_label"
                )
                continue
            try:
                image = read_image(row["path"])
            except (OSError, ValueError) as error:
                reason = f"{type(error).__name__}: {error}"
                block.skipped.append([str(row["image_id"]), str(row["path"]), reason])
                block.records[position].update(decision="skipped", reason="unreadable")
                continue
            if not rule.needs_prediction(label):
                self._apply(block, position, rule, image, None)
                continue
            pending.append((position, rule, image))
            if len(pending) == self.batch_size:
                flush()
        flush()
        return block

    def _apply(
        self,
        block: _Block,
        position: int,
        rule: PseudoRule,
        image: np.ndarray,
        probability: np.ndarray | None,
    ) -> None:
        """Record ``rule``'s decision for one image; keep its masks at native size."""
        record = block.records[position]
        decision = rule.decide(record["origin_label"], probability)
        record.update(
            decision="kept" if decision.keep else "dropped",
            reason=decision.reason,
            pseudo_label=decision.pseudo_label,
            pred_area=decision.pred_area,
            min_area=decision.min_area,
            height=image.shape[0],
            width=image.shape[1],
        )
        if probability is not None:
            record["max_probability"] = float(probability.max())
        if not decision.keep:
            if probability is not None and decision.pred_area > 0:
                threshold = getattr(rule, "threshold", 0.5)
                block.dropped[position] = (probability > threshold).astype(np.uint8)
            return
        if decision.mask is not None and decision.mask.any():
            block.masks[position] = resize_mask(decision.mask, image.shape)
        if self.band is not None and probability is not None:
            block.ignore[position] = resize_mask(self.band.ignore_mask(probability), image.shape)
        if self.soft and probability is not None:
            block.soft[position] = quantise(resize_image(probability, image.shape))

    @staticmethod
    def _write_part(path: Path, block: _Block) -> None:
        """One block's decisions and masks, atomically (the file exists only when complete)."""
        records = [block.records[p] for p in sorted(block.records)]
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as part:
            part.attrs["records"] = json.dumps(records)
            part.attrs["skipped"] = json.dumps(block.skipped)
            for group, masks in (
                ("masks", block.masks),
                ("ignore", block.ignore),
                ("dropped", block.dropped),
            ):
                for position, mask in masks.items():
                    dataset = part.create_dataset(
                        f"{group}/{position:06d}", data=np.packbits(mask, axis=-1)
                    )
                    dataset.attrs["width"] = mask.shape[1]
            for position, soft_map in block.soft.items():
                part.create_dataset(f"soft/{position:06d}", data=soft_map, compression="lzf")

    # ------------------------------------------------------------------------------ merge

    def _merge(
        self, manifest: pd.DataFrame, part_paths: Sequence[Path], out_dir: Path
    ) -> FilterResult:
        """Concatenate the parts into the outputs (each written atomically)."""
        records: list[dict[str, Any]] = []
        skipped: list[list[str]] = []
        masks: dict[int, np.ndarray] = {}
        ignore: dict[int, np.ndarray] = {}
        dropped: dict[int, np.ndarray] = {}
        soft: dict[int, np.ndarray] = {}
        for number, path in enumerate(part_paths):
            offset = number * self.chunk
            with h5py.File(path, "r") as part:
                records += json.loads(part.attrs["records"])
                skipped += json.loads(part.attrs["skipped"])
                for group, target in (("masks", masks), ("ignore", ignore), ("dropped", dropped)):
                    for name, dataset in part.get(group, {}).items():
                        target[offset + int(name)] = _unpack(dataset)
                for name, dataset in part.get("soft", {}).items():
                    soft[offset + int(name)] = dataset[()]
        decisions = pd.DataFrame(records, columns=_DECISION_COLUMNS)
        skipped_table = pd.DataFrame(skipped, columns=["image_id", "path", "error"])
        masks_path = out_dir / "masks.h5"
        pseudo = self._pseudo_manifest(manifest, decisions, masks, ignore, soft, masks_path)
        audit = self._audit(decisions, skipped_table)
        audit["n_soft"] = len(soft)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, table in (
            (PSEUDO_MANIFEST_NAME, pseudo),
            ("decisions.csv", decisions),
            ("skipped.csv", skipped_table),
        ):
            with atomic_path(out_dir / name) as tmp:
                table.to_csv(tmp, index=False)
        _write_masks(masks_path, manifest, masks, ignore, soft)
        atomic_write_bytes(out_dir / "audit.json", json.dumps(audit, indent=2).encode())
        _write_area_histogram(out_dir / "area_histogram.png", decisions)
        if self.gallery_size > 0:
            _write_gallery(
                out_dir / "gallery.png", manifest, decisions, masks, dropped, self.gallery_size
            )
        return FilterResult(pseudo, decisions, skipped_table, audit, out_dir)

    def _pseudo_manifest(
        self,
        manifest: pd.DataFrame,
        decisions: pd.DataFrame,
        masks: dict[int, np.ndarray],
        ignore: dict[int, np.ndarray],
        soft: dict[int, np.ndarray],
        masks_path: Path,
    ) -> pd.DataFrame:
        kept = np.flatnonzero((decisions["decision"] == "kept").to_numpy())
        rows = manifest.iloc[kept][list(MANIFEST_COLUMNS)].copy()
        rows["origin"] = rows["source"]
        rows["origin_label"] = rows["label"]
        rows["source"] = "pseudo"
        rows["label"] = decisions["pseudo_label"].to_numpy()[kept]
        rows["rle"] = [rle.encode(masks[k]) if k in masks else "-1" for k in kept]
        rows["mask_path"] = np.nan
        rows["fold"] = -1
        rows["height"] = decisions["height"].to_numpy()[kept]
        rows["width"] = decisions["width"].to_numpy()[kept]
        rows["mask_area"] = [int(masks[k].sum()) if k in masks else 0 for k in kept]
        rows["pred_area"] = decisions["pred_area"].to_numpy()[kept]
        rows["ignore_rle"] = [rle.encode(ignore[k]) if k in ignore else np.nan for k in kept]
        rows["soft"] = [k in soft for k in kept]
        rows["soft_masks"] = [str(masks_path.resolve()) if k in soft else np.nan for k in kept]
        return validate_manifest(rows.reset_index(drop=True), name="pseudo manifest")

    def _audit(self, decisions: pd.DataFrame, skipped: pd.DataFrame) -> dict[str, Any]:
        labelled = decisions.assign(label=decisions["origin_label"].map(_label_name))
        counts: dict[str, Any] = {}
        for (origin, label, decision), n in (
            labelled.groupby(["origin", "label", "decision"], dropna=False).size().items()
        ):
            counts.setdefault(origin, {}).setdefault(label, {})[decision] = int(n)
        reasons = {str(k): int(v) for k, v in decisions["reason"].value_counts().items()}
        kept = decisions[decisions["decision"] == "kept"]
        return {
            "n_input": len(decisions),
            "n_kept": len(kept),
            "n_kept_positive": int((kept["pseudo_label"] == 1.0).sum()),
            "n_kept_negative": int((kept["pseudo_label"] == 0.0).sum()),
            "n_skipped": len(skipped),
            "counts": counts,
            "reasons": reasons,
            "settings": self.settings(),
        }


def _unpack(dataset: h5py.Dataset) -> np.ndarray:
    return np.unpackbits(dataset[()], axis=-1, count=int(dataset.attrs["width"]))


def _write_masks(
    path: Path,
    manifest: pd.DataFrame,
    masks: dict[int, np.ndarray],
    ignore: dict[int, np.ndarray],
    soft: dict[int, np.ndarray],
) -> None:
    """``masks/<n>`` (bit-packed rows, attrs ``image_id``, ``width``) of the kept non-empty
    masks, ``ignore/<n>`` of the bands, ``soft/<n>`` (uint8 maps, attr ``image_id``) of the
    soft targets, and ``image_ids`` of the masks in row order."""
    ids = manifest["image_id"].astype(str).to_numpy()
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as out:
        out.create_group("soft")
        for row in sorted(soft):
            dataset = out.create_dataset(f"soft/{row:08d}", data=soft[row], compression="lzf")
            dataset.attrs["image_id"] = ids[row]
        for group, target in (("masks", masks), ("ignore", ignore)):
            out.create_group(group)
            for row in sorted(target):
                mask = target[row]
                dataset = out.create_dataset(
                    f"{group}/{row:08d}", data=np.packbits(mask, axis=-1), compression="lzf"
                )
                dataset.attrs.update(image_id=ids[row], width=mask.shape[1])
        out.create_dataset(
            "image_ids", data=[ids[row] for row in sorted(masks)], dtype=h5py.string_dtype()
        )


def read_pseudo_manifest(pseudo_dir: str | os.PathLike) -> pd.DataFrame:
    """The kept images of a filter's output folder (its ``pseudo_manifest.csv``), to train on.

    Raises:
        FileNotFoundError: the folder holds no ``pseudo_manifest.csv`` (not a filter's output,
            or the filter has not finished).
    """
    path = Path(pseudo_dir) / PSEUDO_MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: give the output folder of a finished pseudo-label filter "
            "(e.g. OUT/pseudo of recipes/pseudo_chexpert.py)"
        )
    return pd.read_csv(path, keep_default_na=True)


def read_pseudo_masks(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The kept non-empty masks of a ``masks.h5``: image id → uint8 H×W 0/1 at native size."""
    with h5py.File(path, "r") as file:
        return {str(d.attrs["image_id"]): _unpack(d) for d in file["masks"].values()}


class SoftMaps:
    """The soft pseudo labels of a ``masks.h5``: image id → uint8 H×W map ``round(255·p)`` at
    native size, read on demand (the file is opened once per process, so the object can go
    to DataLoader workers).

    Raises:
        FileNotFoundError: no such file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"soft pseudo labels {self.path} do not exist")
        with h5py.File(self.path, "r") as file:
            group = file.get("soft", {})
            self._names = {str(d.attrs["image_id"]): name for name, d in group.items()}
        self._file: h5py.File | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._names

    def __getitem__(self, image_id: str) -> np.ndarray:
        if image_id not in self._names:
            raise KeyError(f"{self.path} holds no soft pseudo label for image {image_id!r}")
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file["soft"][self._names[image_id]][()]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_pid": None}

    def __repr__(self) -> str:
        return f"SoftMaps({len(self)} maps, {self.path})"


def _write_area_histogram(path: Path, decisions: pd.DataFrame) -> None:
    """Histogram of the predicted lesion area (pixels at the working size) of label-1
    images, kept vs dropped, on a log axis."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    positives = decisions[(decisions["origin_label"] == 1.0) & (decisions["pred_area"] >= 0)]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    areas = positives["pred_area"].to_numpy(np.float64)
    bins = np.logspace(0, np.log10(max(areas.max(initial=1.0), 10.0)) + 0.1, 30)
    for decision, colour in (("kept", "tab:green"), ("dropped", "tab:red")):
        chosen = positives["decision"] == decision
        axis.hist(
            np.maximum(areas[chosen.to_numpy()], 1),
            bins=bins,
            alpha=0.6,
            color=colour,
            label=f"{decision} ({int(chosen.sum())})",
        )
    bound = positives["min_area"].dropna()
    if len(bound):
        axis.axvline(max(float(bound.iloc[0]), 1.0), color="k", linestyle="--", label="min_area")
    axis.set_xscale("log")
    axis.set_xlabel("predicted lesion area (pixels at the working size; 0 shown at 1)")
    axis.set_ylabel("label-1 images")
    axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def _write_gallery(
    path: Path,
    manifest: pd.DataFrame,
    decisions: pd.DataFrame,
    masks: dict[int, np.ndarray],
    dropped: dict[int, np.ndarray],
    per_group: int,
) -> None:
    """Up to ``per_group`` kept positives, kept negatives and dropped label-1 images (the
    first of each, in manifest order), masks outlined (dropped: the model's prediction)."""
    kept = decisions["decision"] == "kept"
    groups = [
        ("kept+", kept & (decisions["pseudo_label"] == 1.0)),
        ("kept-", kept & (decisions["pseudo_label"] == 0.0)),
        ("drop", (decisions["decision"] == "dropped") & (decisions["origin_label"] == 1.0)),
    ]
    images, outlines, titles = [], [], []
    for title, chosen in groups:
        for row in np.flatnonzero(chosen.to_numpy())[:per_group]:
            try:
                image = read_image(manifest.at[row, "path"])
            except (OSError, ValueError):
                continue
            mask = masks.get(row)
            if row in dropped:
                mask = resize_mask(dropped[row], image.shape)
            images.append(image)
            outlines.append(mask)
            titles.append(f"{title} {decisions.at[row, 'pred_area']}px")
    if images:
        write_png(path, contact_sheet(images, outlines, titles, columns=6, tile=160))
