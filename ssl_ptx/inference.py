"""Probability maps from trained models: ensembles, flip TTA, lung crop, compact storage.

:class:`Predictor` turns one or several segmentation models into probability maps:

* **ensembles** — the members' probabilities are averaged with ``weights`` (the 3rd place:
  top-1/2/3 checkpoints of a fold at 0.5 / 0.3 / 0.2; equal weights by default);
* **checkpoint averaging** — a member given as a list of checkpoints of one run is one model
  whose weights are the mean of theirs (:func:`average_checkpoints`);
* **TTA** — each member also sees augmented views of the image (:mod:`ssl_ptx.tta`: the
  horizontal flip by default; rotations, zooms, CLAHE); each view's prediction is taken back
  to the image's frame and the views are averaged (probabilities, not logits), each pixel
  over the views that saw it;
* **lung crop** — with a :class:`~ssl_ptx.lung_crop.LungCropper`, each image is cropped to its
  lung box, segmented at the model's size and pasted back (0 outside the box);
* **presence heads** — models returning ``(mask_logits, presence_logits)`` also give an
  image-level probability, averaged like the maps over the members that have a head;
* **gating** — ``gate=`` chooses the image-level score reported as ``presence``: the presence
  heads' (``"presence"``), an image classifier's probability (``"classifier"``, models of
  :mod:`ssl_ptx.classifier` given as ``classifiers=``), or the 8th place's score, the maximum
  pixel probability of each member averaged over the ensemble (``"max_pixel"``). With
  ``gate_threshold`` an image whose score is below it gets an all-zero map; without one the
  score is kept (in the :class:`ProbabilityStore`) for
  :class:`~ssl_ptx.postprocess.PresenceGate` and its tuner.

Two ways to call it:

``predict_batch(images [B, C, H, W] float in 0..1) -> Prediction``
    the low-level batched call (the pseudo-label filter uses it): maps come back at the
    input's H×W (resized to the model's ``size`` and back when they differ).
``predict(source, store=...) -> ProbabilityStore``
    a manifest (``image_id``, ``path``), a folder of DICOMs, or a dataset of dict samples,
    read in batches with a progress bar; maps at each image's native size (or
    ``output_size``), kept in a :class:`ProbabilityStore` as ``uint8`` (or ``float16``), in
    memory or in an HDF5 file, so thousands of 1024² maps fit.

Checkpoints are the Trainer's (:mod:`ssl_ptx.engine.checkpoint`): read with
``torch.load(weights_only=True)``; the model is rebuilt from the run config stored in them
(``config["model"]``, with ``encoder_weights=None``: the checkpoint holds the weights) and
its input side is ``config["data"]["size"]``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ssl_ptx import classifier as _classifier  # noqa: F401  (registers its model arch)
from ssl_ptx.data.cache import SkippedImage
from ssl_ptx.data.images import ImageReadError, read_image, resize_image
from ssl_ptx.data.siim import find_dicoms, load_siim
from ssl_ptx.engine.checkpoint import CheckpointError, load_checkpoint
from ssl_ptx.engine.trainer import resolve_amp_dtype, split_outputs
from ssl_ptx.fileio import atomic_path
from ssl_ptx.lung_crop import LungCropper, crop, paste
from ssl_ptx.models import create_model
from ssl_ptx.postprocess import quantise
from ssl_ptx.tta import TestTimeAugmentation, parse_tta

__all__ = [
    "GATES",
    "ImagePrediction",
    "Prediction",
    "Predictor",
    "ProbabilityStore",
    "average_checkpoints",
    "checkpoint_input_size",
    "load_model",
    "manifest_from_dicom_folder",
    "run_validation_manifest",
]

Tensor = torch.Tensor
logger = logging.getLogger(__name__)
#: the image-level scores a Predictor can gate on (``gate=``)
GATES = ("classifier", "max_pixel", "presence")
_STORE_DTYPES = {"uint8": np.uint8, "float16": np.float16}
_STORE_VERSION = 1


@dataclass
class Prediction:
    """Output of :meth:`Predictor.predict_batch`, on the CPU.

    Attributes:
        masks: float32 ``[B, H, W]`` pneumothorax probabilities (all zero for images the
            gate emptied).
        presence: float32 ``[B]`` image-level scores: the gate's (classifier probability,
            max-pixel score or presence head), or without a gate the presence heads' when a
            member has one; else None.
    """

    masks: Tensor
    presence: Tensor | None


@dataclass
class ImagePrediction:
    """One image's result in :meth:`Predictor.iter_predictions`.

    Attributes:
        image_id: the image's id.
        probability: float32 ``[H, W]`` map at the image's native size (or ``output_size``).
        presence: image-level score (see :class:`Prediction`), or None.
    """

    image_id: str
    probability: np.ndarray
    presence: float | None


# ---------------------------------------------------------------------------------------------
# checkpoints


def _model_from_state(path: Path, state: Mapping[str, Any]) -> nn.Module:
    config = state.get("config")
    if not isinstance(config, Mapping) or not isinstance(config.get("model"), Mapping):
        raise CheckpointError(
            f"{path}: holds no model config (config['model']) to rebuild the network; build "
            "the model yourself, load the weights with ssl_ptx.engine.load_weights and pass "
            "it to Predictor"
        )
    model = create_model(dict(config["model"]), encoder_weights=None)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not fit its own model config: {error}") from None
    return model.eval()


def load_model(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a Trainer checkpoint (``weights_only`` load) and load its weights.

    Returns:
        ``(model, info)``: the model on the CPU in eval mode, with ``model.model_config``;
        ``info`` is the checkpoint without its weights (``epoch``, ``metrics``, ``config``…).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable, refused by ``weights_only`` loading, without a model
            config, or weights that do not fit it; the message names the file.
    """
    path = Path(path)
    state = load_checkpoint(path, required=("model", "config"))
    model = _model_from_state(path, state)
    return model, {key: value for key, value in state.items() if key != "model"}


def average_checkpoints(paths: Sequence[str | os.PathLike]) -> tuple[nn.Module, dict[str, Any]]:
    """One model whose weights are the mean of several checkpoints of the same run.

    Floating-point tensors (parameters, BatchNorm running statistics) are averaged in
    float64; integer buffers (``num_batches_tracked``) are taken from the first checkpoint.

    Returns:
        ``(model, info)`` as :func:`load_model`, ``info`` from the first checkpoint with
        ``info["averaged"]`` = the paths.

    Raises:
        ValueError: no path.
        CheckpointError: a checkpoint of another model (different model config or keys);
            the message names both files.
    """
    if not paths:
        raise ValueError("average_checkpoints needs at least one checkpoint")
    paths = [Path(p) for p in paths]
    first = load_checkpoint(paths[0], required=("model", "config"))
    totals = {
        key: value.double() if value.is_floating_point() else value.clone()
        for key, value in first["model"].items()
    }
    model_config = first["config"].get("model") if isinstance(first["config"], Mapping) else None
    for path in paths[1:]:
        state = load_checkpoint(path, required=("model", "config"))
        other_config = (
            state["config"].get("model") if isinstance(state["config"], Mapping) else None
        )
        if other_config != model_config or set(state["model"]) != set(totals):
            raise CheckpointError(
                f"{path}: not the same model as {paths[0]} (model config or weight names "
                "differ); only checkpoints of one run can be averaged"
            )
        for key, value in state["model"].items():
            if value.shape != totals[key].shape:
                raise CheckpointError(
                    f"{path}: {key} has shape {tuple(value.shape)}, {paths[0]} has "
                    f"{tuple(totals[key].shape)}"
                )
            if value.is_floating_point():
                totals[key] += value.double()
    averaged = {
        key: (value / len(paths)).to(first["model"][key].dtype)
        if value.is_floating_point()
        else value
        for key, value in totals.items()
    }
    model = _model_from_state(paths[0], {**first, "model": averaged})
    info = {key: value for key, value in first.items() if key != "model"}
    info["averaged"] = [str(p) for p in paths]
    return model, info


def checkpoint_input_size(info: Mapping[str, Any]) -> int | None:
    """The input side a checkpoint's run trained at (``config["data"]["size"]``), or None."""
    data = info.get("config", {}).get("data") if isinstance(info.get("config"), Mapping) else None
    size = data.get("size") if isinstance(data, Mapping) else None
    return int(size) if size is not None else None


def _input_channels(model: nn.Module) -> int | None:
    """Channels the model expects: its ``model_config`` or its first convolution (None if
    neither is known)."""
    config = getattr(model, "model_config", None)
    if isinstance(config, Mapping) and "in_channels" in config:
        return int(config["in_channels"])
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first_conv.in_channels if first_conv is not None else None


def run_validation_manifest(
    info: Mapping[str, Any], siim_dir: str | os.PathLike | None = None
) -> pd.DataFrame:
    """The validation fold of the run that wrote a checkpoint: its out-of-fold images.

    Args:
        info: the checkpoint (or :func:`load_model`'s ``info``) with the run's ``config``.
        siim_dir: the SIIM folder; default: the run's ``data.siim_dir``, else its demo root's
            ``siim/`` (paths as the run saw them).

    Returns:
        The manifest rows of fold ``data.fold`` under the run's ``n_folds`` and
        ``fold_seed`` (:func:`~ssl_ptx.data.siim.load_siim`), with native ``height``, ``width``
        and the truth ``rle``.

    Raises:
        ValueError: the checkpoint holds no data config.
        FileNotFoundError: the SIIM folder does not exist (pass ``siim_dir``).
    """
    config = info.get("config")
    data = config.get("data") if isinstance(config, Mapping) else None
    if not isinstance(data, Mapping):
        raise ValueError("the checkpoint holds no data config (config['data']) naming its folds")
    if siim_dir is None:
        siim_dir = data.get("siim_dir") or Path(data["demo_dir"]) / "siim"
    siim_dir = Path(siim_dir)
    if not siim_dir.is_dir():
        raise FileNotFoundError(
            f"the run's SIIM folder {siim_dir} does not exist; pass the folder (siim_dir=)"
        )
    manifest = load_siim(siim_dir, n_folds=data["n_folds"], seed=data["fold_seed"], progress=False)
    return manifest[manifest["fold"] == data["fold"]].reset_index(drop=True)


def manifest_from_dicom_folder(folder: str | os.PathLike) -> pd.DataFrame:
    """``image_id`` (file stem) and ``path`` of every DICOM under ``folder``, sorted by id.

    Raises:
        FileNotFoundError: ``folder`` is not a directory or holds no ``.dcm`` file.
    """
    found = find_dicoms(folder)
    if not found:
        raise FileNotFoundError(f"{folder}: no .dcm file in it or its subfolders")
    ids = sorted(found)
    return pd.DataFrame({"image_id": ids, "path": [str(found[i]) for i in ids]})


# ---------------------------------------------------------------------------------------------
# the store


class ProbabilityStore:
    """Probability maps by image id, kept compactly, in memory or in an HDF5 file.

    ``dtype="uint8"`` keeps ``round(255·p)`` (1 byte per pixel, error <= 1/510; the codes the
    tuner of :mod:`ssl_ptx.postprocess` works on), ``"float16"`` keeps 2 bytes (relative
    error ~5e-4). Maps may differ in size.

    With ``path`` the maps go to an HDF5 file (``maps/<n>`` datasets, lzf-compressed;
    ``image_ids``; ``presence``, NaN where none), written under a temporary name and renamed
    onto ``path`` by :meth:`close` (or at the end of a ``with`` block; after an exception in
    the block the temporary file is removed and ``path`` is left as it was).
    :meth:`open` reads a finished file.

    Args:
        path: the HDF5 file to write, or None to keep the maps in memory.
        dtype: "uint8" or "float16".
    """

    def __init__(self, path: str | os.PathLike | None = None, *, dtype: str = "uint8") -> None:
        if dtype not in _STORE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_STORE_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self.path = Path(path) if path is not None else None
        self._ids: list[str] = []
        self._index: dict[str, int] = {}
        self._presence: list[float] = []
        self._maps: list[np.ndarray] = []
        self._writable = True
        self._stack = contextlib.ExitStack()
        self._file: h5py.File | None = None
        if self.path is not None:
            temporary = self._stack.enter_context(atomic_path(self.path))
            try:
                self._file = h5py.File(temporary, "w")
            except BaseException:
                self._stack.__exit__(*sys.exc_info())
                raise
            self._file.attrs["version"] = _STORE_VERSION
            self._file.attrs["dtype"] = dtype
            self._file.create_group("maps")

    @classmethod
    def open(cls, path: str | os.PathLike) -> ProbabilityStore:
        """Open a file written by a store with a ``path`` (read-only).

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a probability store (the message names the file).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"probability store {path} does not exist")
        try:
            handle = h5py.File(path, "r")
        except OSError as error:
            raise ValueError(f"{path}: not an HDF5 file: {error}") from None
        if handle.attrs.get("version") != _STORE_VERSION or "image_ids" not in handle:
            handle.close()
            raise ValueError(f"{path}: not a probability store written by ProbabilityStore")
        store = cls.__new__(cls)
        store.dtype = str(handle.attrs["dtype"])
        store.path = path
        store._ids = [i.decode() if isinstance(i, bytes) else str(i) for i in handle["image_ids"]]
        store._index = {image_id: n for n, image_id in enumerate(store._ids)}
        store._presence = handle["presence"][:].astype(np.float64).tolist()
        store._maps = []
        store._writable = False
        store._stack = contextlib.ExitStack()
        store._file = handle
        return store

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    @property
    def image_ids(self) -> list[str]:
        """Ids in the order they were added."""
        return list(self._ids)

    def add(self, image_id: str, probability: np.ndarray, presence: float | None = None) -> None:
        """Store one H×W map of probabilities in [0, 1] (and its presence probability).

        Raises:
            ValueError: a duplicate id, a map that is not H×W, or a read-only store.
        """
        if not self._writable:
            raise ValueError(f"probability store {self.path} is read-only")
        if image_id in self._index:
            raise ValueError(f"image {image_id!r} is already in the probability store")
        probability = np.asarray(probability)
        if probability.ndim != 2:
            raise ValueError(f"image {image_id!r}: expected an H×W map, got {probability.shape}")
        if self.dtype == "uint8":
            stored = quantise(probability)
        else:
            stored = np.clip(probability, 0.0, 1.0).astype(np.float16)
        if stored is probability:  # uint8 input: keep a copy, not the caller's array
            stored = stored.copy()
        number = len(self._ids)
        if self._file is not None:
            self._file["maps"].create_dataset(f"{number:08d}", data=stored, compression="lzf")
        else:
            self._maps.append(stored)
        self._ids.append(str(image_id))
        self._index[str(image_id)] = number
        self._presence.append(np.nan if presence is None else float(presence))

    def _position(self, image_id: str) -> int:
        try:
            return self._index[image_id]
        except KeyError:
            raise KeyError(f"image {image_id!r} is not in the probability store") from None

    def stored(self, image_id: str) -> np.ndarray:
        """The map as stored: ``uint8`` codes ``round(255·p)`` or ``float16`` probabilities."""
        number = self._position(image_id)
        if self._file is not None:
            return self._file["maps"][f"{number:08d}"][()]
        return self._maps[number]

    def __getitem__(self, image_id: str) -> np.ndarray:
        """The map as float32 probabilities, H×W."""
        stored = self.stored(image_id)
        if stored.dtype == np.uint8:
            return stored.astype(np.float32) / 255.0
        return stored.astype(np.float32)

    def presence(self, image_id: str) -> float | None:
        """The image-level presence probability, or None."""
        value = self._presence[self._position(image_id)]
        return None if np.isnan(value) else value

    def presences(self, image_ids: Sequence[str] | None = None) -> np.ndarray:
        """float64 presence probabilities of ``image_ids`` (default all), NaN where none."""
        ids = self._ids if image_ids is None else image_ids
        return np.array([self._presence[self._position(i)] for i in ids], np.float64)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored maps (uncompressed)."""
        itemsize = np.dtype(_STORE_DTYPES[self.dtype]).itemsize
        if self._file is not None:
            return sum(d.size * itemsize for d in self._file["maps"].values())
        return sum(m.nbytes for m in self._maps)

    def close(self) -> None:
        """Finish the file (written stores: index datasets, then the rename onto ``path``)."""
        if self._file is None:
            return
        if self._writable:
            self._file.create_dataset(
                "image_ids", data=np.array(self._ids, dtype=object), dtype=h5py.string_dtype()
            )
            self._file.create_dataset("presence", data=np.array(self._presence, np.float32))
            self._writable = False
        self._file.close()
        self._file = None
        self._stack.close()

    def _discard(self, exc_info: tuple[Any, Any, Any]) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._writable = False
        self._stack.__exit__(*exc_info)

    def __enter__(self) -> ProbabilityStore:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if exc_info[0] is None:
            self.close()
        else:
            self._discard(exc_info)

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "memory"
        return f"ProbabilityStore({len(self)} maps, {self.dtype}, {where})"


# ---------------------------------------------------------------------------------------------
# the predictor


class _ImageFiles(Dataset):
    """(image_id, uint8 H×W image) of manifest rows, read with ``read_image``."""

    def __init__(self, manifest: pd.DataFrame) -> None:
        missing = [c for c in ("image_id", "path") if c not in manifest.columns]
        if missing:
            raise ValueError(f"manifest lacks column(s) {missing}; has {list(manifest.columns)}")
        self.ids = manifest["image_id"].astype(str).tolist()
        self.paths = manifest["path"].astype(str).tolist()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[str, np.ndarray | SkippedImage]:
        """``(image_id, image)``, or ``(image_id, SkippedImage)`` when the file is unreadable."""
        image_id, path = self.ids[index], self.paths[index]
        try:
            return image_id, read_image(path)
        except (ImageReadError, FileNotFoundError) as error:
            return image_id, SkippedImage(image_id, path, str(error))


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Predictor:
    """Probability maps from one model or an ensemble; see the module docstring.

    Args:
        models: a model or a sequence of models returning mask logits ``[B, 1, H, W]`` or
            ``(mask_logits, presence_logits [B, 1])``. They are moved to ``device``; each call
            puts them in eval mode and restores their mode afterwards.
        weights: one non-negative weight per model (normalised to sum 1); default equal.
        tta: augmentations (names of :func:`ssl_ptx.tta.parse_tta` such as ``"hflip"``,
            ``"rot-10"``, ``"scale1.1"``, ``"clahe"``, or objects) averaged with the plain
            view; ``("hflip",)`` by default, ``()`` for none.
        lung_cropper: crop each image to its lung box before segmenting (needs ``size``).
        size: the models' square input side in pixels; images are resized to it (and the maps
            back). None feeds images at their own size (H and W must suit the models).
        device: "cuda", "cpu", … ; None picks CUDA when available.
        batch_size: images per forward pass in :meth:`predict`.
        amp: autocast of the forward pass: "auto" (bf16 on CUDA that supports it, none on the
            CPU), "none", "bf16" or "fp16". Probabilities are computed in float32.
        progress: show a progress bar in :meth:`predict`.
        classifiers: image classifiers returning logits ``[B, 1]`` (see
            :mod:`ssl_ptx.classifier`), averaged with equal weights over them and the TTA
            views, for ``gate="classifier"``. They see the whole image (no lung crop).
        classifier_size: the classifiers' square input side; None feeds the images at their
            own size.
        gate: None, or the image score to gate on: ``"classifier"``, ``"max_pixel"`` or
            ``"presence"`` (see the module docstring).
        gate_threshold: images whose gate score is below it get an all-zero map; None keeps
            every map (the score is still reported, for tuning).

    Raises:
        ValueError: no model, bad weights, unknown TTA names, lung crop without ``size``, an
            unknown gate, a classifier gate without classifiers, or a threshold without a
            gate or outside [0, 1].
    """

    def __init__(
        self,
        models: nn.Module | Sequence[nn.Module],
        *,
        weights: Sequence[float] | None = None,
        tta: Sequence[str] = ("hflip",),
        lung_cropper: LungCropper | None = None,
        size: int | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 8,
        amp: str = "auto",
        progress: bool = True,
        classifiers: nn.Module | Sequence[nn.Module] = (),
        classifier_size: int | None = None,
        gate: str | None = None,
        gate_threshold: float | None = None,
    ) -> None:
        members = [models] if isinstance(models, nn.Module) else list(models)
        if not members:
            raise ValueError("Predictor needs at least one model")
        if weights is None:
            weights = [1.0] * len(members)
        weights = np.asarray(weights, np.float64)
        if weights.shape != (len(members),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(
                f"weights must be {len(members)} non-negative numbers with a positive sum, "
                f"got {weights.tolist()}"
            )
        augmentations = [a if isinstance(a, TestTimeAugmentation) else parse_tta(a) for a in tta]
        judges = [classifiers] if isinstance(classifiers, nn.Module) else list(classifiers)
        _check_gate(gate, gate_threshold, bool(judges))
        if lung_cropper is not None and size is None:
            raise ValueError("lung cropping needs size= (the side the crops are resized to)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = _resolve_device(device)
        self.models = [model.to(self.device) for model in members]
        self.weights = weights / weights.sum()
        self.augmentations = augmentations
        self.tta = tuple(augmentation.name for augmentation in augmentations)
        self.classifiers = [model.to(self.device) for model in judges]
        self.classifier_size = int(classifier_size) if classifier_size is not None else None
        self.gate = gate
        self.gate_threshold = gate_threshold
        self.lung_cropper = lung_cropper
        self.size = int(size) if size is not None else None
        self.batch_size = int(batch_size)
        self.amp_dtype = resolve_amp_dtype(amp, self.device)
        self.progress = progress
        self.skipped: list[SkippedImage] = []
        self._channels = [_input_channels(model) for model in self.models]
        self._classifier_channels = [_input_channels(model) for model in self.classifiers]

    @classmethod
    def from_checkpoints(
        cls,
        checkpoints: Sequence[str | os.PathLike | Sequence[str | os.PathLike]],
        *,
        weights: Sequence[float] | None = None,
        size: int | None = None,
        classifier_checkpoints: Sequence[str | os.PathLike] = (),
        **kwargs: Any,
    ) -> Predictor:
        """A predictor over Trainer checkpoints.

        Args:
            checkpoints: one entry per ensemble member: a checkpoint path, or a list of
                checkpoint paths of one run whose weights are averaged into one model.
            weights: one weight per member (e.g. 0.5, 0.3, 0.2 for a fold's top-3).
            size: the input side; default: ``config["data"]["size"]`` of the checkpoints,
                which must then agree.
            classifier_checkpoints: image classifiers (``recipes/train_classifier.py``) for
                ``gate="classifier"``; their input side is read from them and must agree.
            **kwargs: the other arguments of :class:`Predictor` (``tta``, ``lung_cropper``,
                ``device``, ``batch_size``, ``amp``, ``progress``, ``gate``,
                ``gate_threshold``).

        Raises:
            CheckpointError: as :func:`load_model` / :func:`average_checkpoints`.
            ValueError: no checkpoint, or members trained at different sizes without
                ``size``.
        """
        if isinstance(checkpoints, (str, os.PathLike)):
            checkpoints = [checkpoints]
        if not checkpoints:
            raise ValueError("from_checkpoints needs at least one checkpoint")
        models, sizes = [], {}
        for entry in checkpoints:
            if isinstance(entry, (str, os.PathLike)):
                model, info = load_model(entry)
            else:
                model, info = average_checkpoints(list(entry))
            models.append(model)
            sizes[str(entry)] = checkpoint_input_size(info)
        if size is None:
            known = {s for s in sizes.values() if s is not None}
            if len(known) > 1:
                raise ValueError(
                    f"the checkpoints were trained at different sizes {sizes}; pass size="
                )
            size = known.pop() if known else None
        if classifier_checkpoints:
            judges = [load_model(path) for path in classifier_checkpoints]
            judge_sizes = {checkpoint_input_size(info) for _, info in judges}
            if len(judge_sizes) > 1:
                raise ValueError(
                    f"the classifiers were trained at different sizes {sorted(judge_sizes)}"
                )
            kwargs.update(
                classifiers=[model for model, _ in judges], classifier_size=judge_sizes.pop()
            )
        return cls(models, weights=weights, size=size, **kwargs)

    # ----------------------------------------------------------------------------- forward

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        modes = [model.training for model in self.models]
        for model in self.models:
            model.eval()
        try:
            yield
        finally:
            for model, mode in zip(self.models, modes, strict=True):
                model.train(mode)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _views(self, images: Tensor) -> list[Tensor]:
        """The plain images and one view per augmentation."""
        return [images] + [augmentation.forward(images) for augmentation in self.augmentations]

    def _merge_views(self, probabilities: Tensor) -> Tensor:
        """Average the views' maps ``[V·B, H, W]`` in the images' frame, each pixel over the
        views that saw it (weight maps of :mod:`ssl_ptx.tta`)."""
        chunks = probabilities.chunk(len(self.augmentations) + 1)
        total, weight = chunks[0].clone(), torch.ones_like(chunks[0])
        for chunk, augmentation in zip(chunks[1:], self.augmentations, strict=True):
            restored, seen = augmentation.inverse(chunk)
            total += restored
            weight = weight + (1.0 if seen is None else seen)
        return total / weight

    @torch.no_grad()
    def _forward(self, images: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """Ensemble × TTA probabilities of ``[B, C, H, W]`` images at the models' input size:
        ``(maps [B, H', W'] float32, presence [B] or None, max_pixel [B])`` on the CPU, where
        ``max_pixel`` is each member's largest map value averaged over the members."""
        images = images.to(self.device, torch.float32)
        views = self._views(images)
        total: Tensor | None = None
        max_pixel: Tensor | None = None
        presence_total: Tensor | None = None
        presence_weight = 0.0
        with self._eval_mode():
            for model, weight, channels in zip(
                self.models, self.weights, self._channels, strict=True
            ):
                batch = _match_channels(torch.cat(views), channels)
                with self._autocast():
                    outputs = model(batch)
                mask_logits, presence_logits = split_outputs(outputs)
                merged = self._merge_views(torch.sigmoid(mask_logits.float()).flatten(0, -3))
                peak = merged.flatten(1).amax(1) * weight
                total = merged * weight if total is None else total + merged * weight
                max_pixel = peak if max_pixel is None else max_pixel + peak
                if presence_logits is not None:
                    present = torch.sigmoid(presence_logits.float()).reshape(len(views), -1)
                    present = present.mean(0) * weight
                    presence_total = present if presence_total is None else presence_total + present
                    presence_weight += weight
        presence = None if presence_total is None else (presence_total / presence_weight).cpu()
        return total.cpu(), presence, max_pixel.cpu()

    @torch.no_grad()
    def _classify(self, images: Tensor) -> Tensor:
        """Mean classifier probability ``[B]`` (CPU) of ``[B, C, H, W]`` images in 0..1,
        resized to ``classifier_size``, over the classifiers and the TTA views."""
        images = images.to(self.device, torch.float32)
        side = self.classifier_size
        if side is not None and tuple(images.shape[-2:]) != (side, side):
            images = F.interpolate(images, size=(side, side), mode="bilinear", antialias=True)
        views = torch.cat(self._views(images))
        total = torch.zeros(len(images), device=self.device)
        modes = [model.training for model in self.classifiers]
        try:
            for model, channels in zip(self.classifiers, self._classifier_channels, strict=True):
                model.eval()
                with self._autocast():
                    logits = model(_match_channels(views, channels))
                total += torch.sigmoid(logits.float()).reshape(-1, len(images)).mean(0)
        finally:
            for model, mode in zip(self.classifiers, modes, strict=True):
                model.train(mode)
        return (total / len(self.classifiers)).cpu()

    def _gated(
        self,
        maps: Tensor,
        presence: Tensor | None,
        max_pixel: Tensor,
        classify: Callable[[], Tensor],
    ) -> tuple[Tensor, Tensor | None]:
        """``(maps, score)``: the gate's image score (``presence`` without a gate) and the
        maps with those of images scored below ``gate_threshold`` set to zero."""
        if self.gate is None:
            return maps, presence
        if self.gate == "presence":
            if presence is None:
                raise ValueError('gate="presence" needs a model with a presence head')
            score = presence
        elif self.gate == "max_pixel":
            score = max_pixel
        else:
            score = classify()
        if self.gate_threshold is not None:
            keep = (score >= self.gate_threshold).to(maps.dtype)
            maps = maps * keep.reshape(-1, *([1] * (maps.ndim - 1)))
        return maps, score

    def predict_batch(self, images: Tensor) -> Prediction:
        """Probabilities of a batch of images.

        Args:
            images: float ``[B, C, H, W]`` in 0..1 (C = 1, or the models' channels; a single
                channel is repeated for 3-channel models), any device.

        Returns:
            :class:`Prediction` with maps ``[B, H, W]`` at the input's size. Images are resized
            to ``size`` for the models (bilinear, antialiased) and the maps back; with a lung
            cropper each image is cropped from its 8-bit version ``round(255·x)`` (channel 0).
            The gate, if any, has emptied the maps of images scored below ``gate_threshold``.
        """
        if images.ndim != 4:
            raise ValueError(
                f"predict_batch expects [B, C, H, W] images, got {tuple(images.shape)}"
            )
        if self.lung_cropper is not None:
            grey = (images[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            maps, presence = self._predict_arrays(list(grey))
            return Prediction(torch.from_numpy(np.stack(maps)), presence)
        height, width = images.shape[-2:]
        inputs = images
        if self.size is not None and (height, width) != (self.size, self.size):
            inputs = F.interpolate(
                images.float(), size=(self.size, self.size), mode="bilinear", antialias=True
            )
        maps, presence, max_pixel = self._forward(inputs)
        maps, presence = self._gated(maps, presence, max_pixel, lambda: self._classify(images))
        if maps.shape[-2:] != (height, width):
            maps = F.interpolate(
                maps[:, None], size=(height, width), mode="bilinear", antialias=True
            )[:, 0]
        return Prediction(maps.contiguous(), presence)

    def _predict_arrays(
        self, images: Sequence[np.ndarray]
    ) -> tuple[list[np.ndarray], Tensor | None]:
        """Float32 maps at each uint8 H×W image's own size (lung crop when configured)."""
        boxes = None
        if self.lung_cropper is not None:
            boxes = [box for box, _ in self.lung_cropper.boxes(images)]
            inputs = [crop(image, box, self.size) for image, box in zip(images, boxes, strict=True)]
        elif self.size is not None:
            inputs = [resize_image(image, self.size) for image in images]
        else:
            inputs = list(images)
        shapes = {image.shape for image in inputs}
        if len(shapes) > 1:
            raise ValueError(
                f"images of different sizes {sorted(shapes)} in one batch: give the Predictor "
                "a size= to resize them to"
            )
        tensor = torch.from_numpy(np.stack(inputs)).float().div_(255.0).unsqueeze(1)
        maps, presence, max_pixel = self._forward(tensor)
        maps, presence = self._gated(
            maps, presence, max_pixel, lambda: self._classify_arrays(images)
        )
        maps_np = maps.numpy()
        if boxes is not None:
            outputs = [
                paste(m, box, image.shape)
                for m, box, image in zip(maps_np, boxes, images, strict=True)
            ]
        else:
            outputs = [
                resize_image(m, image.shape) for m, image in zip(maps_np, images, strict=True)
            ]
        return outputs, presence

    def _classify_arrays(self, images: Sequence[np.ndarray]) -> Tensor:
        """:meth:`_classify` of uint8 H×W images (resized to ``classifier_size`` first)."""
        if self.classifier_size is not None:
            images = [resize_image(image, self.classifier_size) for image in images]
        if len({image.shape for image in images}) > 1:
            raise ValueError(
                "images of different sizes in one batch: the classifiers need a "
                "classifier_size= to resize them to"
            )
        return self._classify(torch.from_numpy(np.stack(images)).float().div_(255.0)[:, None])

    # ----------------------------------------------------------------------------- sources

    def iter_predictions(
        self,
        source: pd.DataFrame | str | os.PathLike | Dataset,
        *,
        output_size: int | tuple[int, int] | None = None,
        num_workers: int = 0,
    ) -> Iterator[ImagePrediction]:
        """Predict every image of ``source``, in batches, with a progress bar.

        Args:
            source: a manifest (``image_id``, ``path``: DICOM, PNG, JPEG…), a folder of DICOMs
                (:func:`manifest_from_dicom_folder`), or a dataset of dict samples with
                ``image`` (float ``[C, H, W]`` in 0..1) and ``image_id``
                (:class:`~ssl_ptx.data.datasets.SegmentationDataset`).
            output_size: side (or ``(H, W)``) of the returned maps; None: each image's size
                (native for files, the dataset's size for datasets).
            num_workers: DataLoader processes that read the files.

        Yields:
            :class:`ImagePrediction` per image, in the source's order. A file of a manifest or
            folder that cannot be read (:class:`~ssl_ptx.data.images.ImageReadError`, missing)
            yields nothing: it is logged and listed in :attr:`skipped`
            (:class:`~ssl_ptx.data.cache.SkippedImage`, reset by each call), and the run
            goes on.
        """
        self.skipped = []
        if isinstance(source, (str, os.PathLike)):
            source = manifest_from_dicom_folder(source)
        if isinstance(source, pd.DataFrame):
            loader = DataLoader(
                _ImageFiles(source),
                batch_size=self.batch_size,
                num_workers=num_workers,
                collate_fn=_as_list,
            )
        else:
            loader = DataLoader(source, batch_size=self.batch_size, num_workers=num_workers)
        bar = tqdm(
            total=len(loader.dataset), desc="predicting", unit="img", disable=not self.progress
        )
        with bar:
            for batch in loader:
                if isinstance(batch, list):
                    readable = self._readable(batch)
                    bar.update(len(batch) - len(readable))
                    if not readable:
                        continue
                    ids = [image_id for image_id, _ in readable]
                    maps, presence = self._predict_arrays([image for _, image in readable])
                else:
                    ids = list(batch["image_id"])
                    prediction = self.predict_batch(batch["image"])
                    maps, presence = list(prediction.masks.numpy()), prediction.presence
                for index, (image_id, probability) in enumerate(zip(ids, maps, strict=True)):
                    if output_size is not None:
                        probability = resize_image(probability, output_size)
                    yield ImagePrediction(
                        image_id=str(image_id),
                        probability=probability,
                        presence=None if presence is None else float(presence[index]),
                    )
                bar.update(len(ids))

    def _readable(
        self, batch: list[tuple[str, np.ndarray | SkippedImage]]
    ) -> list[tuple[str, np.ndarray]]:
        """The images of a batch of files that could be read; the others go to ``skipped``."""
        readable = []
        for image_id, image in batch:
            if isinstance(image, SkippedImage):
                logger.warning("skipped image %s: %s", image_id, image.error)
                self.skipped.append(image)
            else:
                readable.append((image_id, image))
        return readable

    def predict(
        self,
        source: pd.DataFrame | str | os.PathLike | Dataset,
        store: ProbabilityStore | None = None,
        *,
        output_size: int | tuple[int, int] | None = None,
        num_workers: int = 0,
    ) -> ProbabilityStore:
        """Predict every image of ``source`` into ``store`` (default: a new uint8 in-memory
        store); arguments as :meth:`iter_predictions`. Returns the store."""
        store = ProbabilityStore() if store is None else store
        for result in self.iter_predictions(
            source, output_size=output_size, num_workers=num_workers
        ):
            store.add(result.image_id, result.probability, result.presence)
        return store

    def __repr__(self) -> str:
        crop_text = ", lung crop" if self.lung_cropper is not None else ""
        gate_text = ""
        if self.gate is not None:
            gate_text = f", gate={self.gate}"
            if self.gate == "classifier":
                gate_text += f" ({len(self.classifiers)} classifier(s))"
            if self.gate_threshold is not None:
                gate_text += f" >= {self.gate_threshold:g}"
        return (
            f"Predictor({len(self.models)} model(s), weights={np.round(self.weights, 3).tolist()}, "
            f"tta={list(self.tta)}, size={self.size}{crop_text}{gate_text}, device={self.device})"
        )


def _check_gate(gate: str | None, threshold: float | None, has_classifiers: bool) -> None:
    """Validate the gate arguments of :class:`Predictor`."""
    if gate is not None and gate not in GATES:
        raise ValueError(f"unknown gate {gate!r}; known: {list(GATES)} or None")
    if gate == "classifier" and not has_classifiers:
        raise ValueError('gate="classifier" needs classifiers= (or classifier_checkpoints=)')
    if threshold is not None:
        if gate is None:
            raise ValueError("gate_threshold needs a gate (classifier, max_pixel or presence)")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"gate_threshold must be in [0, 1], got {threshold}")


def _match_channels(images: Tensor, channels: int | None) -> Tensor:
    """Repeat a single grey channel for a model expecting ``channels``."""
    if channels is None or images.shape[1] == channels:
        return images
    if images.shape[1] == 1:
        return images.expand(-1, channels, -1, -1)
    raise ValueError(f"images have {images.shape[1]} channels, the model expects {channels}")
