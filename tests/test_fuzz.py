"""Property tests (issue 10): the RLE codec and the label-file readers under random input.

* RLE: ``decode(encode(mask)) == mask`` for random masks and shapes, the string is the
  canonical SIIM form (first start absolute, later starts relative, runs maximal), its
  :func:`~ssl_ptx.data.rle.area` is the mask's, and instance masks decode to their union;
* any text into the decoder returns a 0/1 mask of the asked shape or raises ``ValueError``;
* the CSV readers (SIIM ``train-rle.csv``, CheXpert ``train.csv``, NIH ``Data_Entry`` and
  ``BBox_List``, the manifest reader) on mutated files (a column dropped or renamed, a garbage
  cell, an empty file, another delimiter, a cut, random bytes) return a table or raise the
  library's own ``ValueError`` naming the file — never a pandas / numpy error or a crash.

Example counts are set per property in :data:`EXAMPLES` (see ``docs/reliability.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from external_data import chexpert, nih
from ssl_ptx.data import rle
from ssl_ptx.data.manifest import read_manifest_csv
from ssl_ptx.data.siim import read_rle_csv

#: examples per property (the CSV property runs this many per reader)
EXAMPLES = {"round_trip": 300, "union": 100, "decoder_text": 400, "decoder_numbers": 300}
CSV_EXAMPLES = 150

_shapes = st.tuples(st.integers(1, 48), st.integers(1, 48))


@st.composite
def masks(draw: st.DrawFn) -> np.ndarray:
    """H×W uint8 masks from empty to full: random pixels, or random rectangles (long runs)."""
    shape = draw(_shapes)
    if draw(st.booleans()):
        return draw(arrays(np.uint8, shape, elements=st.integers(0, 1)))
    mask = np.zeros(shape, np.uint8)
    for _ in range(draw(st.integers(0, 4))):
        y0, y1 = sorted(draw(st.tuples(st.integers(0, shape[0]), st.integers(0, shape[0]))))
        x0, x1 = sorted(draw(st.tuples(st.integers(0, shape[1]), st.integers(0, shape[1]))))
        mask[y0:y1, x0:x1] = 1
    return mask


@settings(max_examples=EXAMPLES["round_trip"], deadline=None)
@given(masks())
def test_rle_round_trip_is_exact_and_canonical(mask: np.ndarray) -> None:
    code = rle.encode(mask)
    np.testing.assert_array_equal(rle.decode(code, mask.shape), mask)
    assert rle.area(code) == int(mask.sum())
    if not mask.any():
        assert code == rle.EMPTY
        return
    tokens = np.array(code.split(), np.int64)
    starts, lengths = tokens[0::2], tokens[1::2]
    assert (lengths > 0).all() and (starts[1:] > 0).all()  # runs are maximal: gaps of >= 1
    flat = mask.T.ravel()  # column-major, as the competition's files
    assert starts[0] == np.flatnonzero(flat)[0]
    assert rle.encode(rle.decode(code, mask.shape)) == code


@settings(max_examples=EXAMPLES["union"], deadline=None)
@given(_shapes.flatmap(lambda s: st.lists(arrays(np.uint8, s, elements=st.integers(0, 1)))))
def test_instances_decode_to_their_union(instances: list[np.ndarray]) -> None:
    if not instances:
        return
    shape = instances[0].shape
    union = np.logical_or.reduce(instances).astype(np.uint8)
    np.testing.assert_array_equal(rle.decode_union(map(rle.encode, instances), shape), union)


def _decode_or_value_error(text: str, shape: tuple[int, int]) -> None:
    """``decode`` returns a 0/1 uint8 mask of ``shape`` whose area is ``area(text)``, or
    both raise exactly ``ValueError``."""
    try:
        mask = rle.decode(text, shape)
    except ValueError as error:
        assert type(error) is ValueError and str(error)
        return
    assert mask.shape == shape and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert rle.area(text) >= int(mask.sum())  # overlapping runs count twice in area


@settings(max_examples=EXAMPLES["decoder_text"], deadline=None)
@given(st.text(), _shapes)
def test_any_text_into_the_decoder_raises_only_value_error(
    text: str, shape: tuple[int, int]
) -> None:
    _decode_or_value_error(text, shape)


_numbers = st.one_of(
    st.integers(-3, 60).map(str),
    st.integers(0, 10**25).map(str),
    st.sampled_from(["+1", "-0", "+-1", "1_0", "٣", "²", "1e3", "0x1", "1.0", "", "-1"]),
)


@settings(max_examples=EXAMPLES["decoder_numbers"], deadline=None)
@given(
    st.lists(_numbers, max_size=12),
    st.sampled_from([" ", "  ", "\t", "\n", " \u3000 "]),
    _shapes,
)
def test_number_like_tokens_into_the_decoder_raise_only_value_error(
    tokens: list[str], separator: str, shape: tuple[int, int]
) -> None:
    _decode_or_value_error(separator.join(tokens), shape)


# --------------------------------------------------------------------------------- CSV readers

_SIIM = """ImageId, EncodedPixels
1.2.276.0.7230010.3.1.4.8323329.1, -1
1.2.276.0.7230010.3.1.4.8323329.2, 10 5 20 3
1.2.276.0.7230010.3.1.4.8323329.2, 100 2
"""
_CHEXPERT = """Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Pneumothorax
CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,
CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,,1.0
CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg,Male,83,Lateral,,,-1.0
"""
_NIH = """Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,\
View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],
00000001_000.png,Cardiomegaly,0,1,058Y,M,PA,2682,2749,0.143,0.143,
00000001_001.png,Cardiomegaly|Pneumothorax,1,1,58,M,PA,2894,2729,0.143,0.143,
00000002_000.png,No Finding,0,2,81,M,AP,2500,2048,0.171,0.171,
"""
_BBOX = """Image Index,Finding Label,Bbox [x,y,w,h],,,
00013118_008.png,Atelectasis,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661
00014716_007.png,Pneumothorax,686.101694915254,131.543713173706,185.491525423729,313.491525423729
"""
_MANIFEST = """image_id,path,source,label,rle,mask_path,fold,view,patient_id,height,width,mask_area
a,/data/a.dcm,siim,1.0,10 5,,0,PA,p1,1024,1024,5
b,/data/b.png,chexpert,,,,-1,AP,p2,0,0,-1
c,/data/c.png,montgomery,,,/data/c_mask.png,2,,,320,390,1200
"""

READERS: dict[str, tuple[Callable[[Path], pd.DataFrame], str]] = {
    "siim_train_rle": (read_rle_csv, _SIIM),
    "chexpert_train": (chexpert.read_labels, _CHEXPERT),
    "nih_data_entry": (nih.read_labels, _NIH),
    "nih_bbox_list": (nih.read_bbox, _BBOX),
    "manifest": (read_manifest_csv, _MANIFEST),
}
#: rows each unmutated file reads to (SIIM: one per image; CheXpert: frontal images only)
EXPECTED_ROWS = {
    "siim_train_rle": 2,
    "chexpert_train": 2,
    "nih_data_entry": 3,
    "nih_bbox_list": 2,
    "manifest": 3,
}
_cells = st.one_of(
    st.text(max_size=12),
    st.sampled_from(['"', '""', ",", "\n", "nan", "-1", "1e400", "-", "[", "]", " ", "\x00"]),
)


def _rows(text: str) -> list[list[str]]:
    return [line.split(",") for line in text.splitlines()]


def _join(rows: list[list[str]], delimiter: str = ",") -> str:
    return "\n".join(delimiter.join(row) for row in rows) + "\n"


@st.composite
def mutated(draw: st.DrawFn, text: str) -> bytes:
    """``text`` after one random mutation, as bytes."""
    rows = _rows(text)
    kind = draw(
        st.sampled_from(
            ["drop_column", "rename_column", "garbage_cell", "empty", "delimiter", "cut",
             "bytes", "duplicate_row", "blank_cells"]
        )
    )  # fmt: skip
    width = len(rows[0])
    if kind == "drop_column":
        column = draw(st.integers(0, width - 1))
        return _join([row[:column] + row[column + 1 :] for row in rows]).encode()
    if kind == "rename_column":
        rows[0][draw(st.integers(0, width - 1))] = draw(_cells)
        return _join(rows).encode()
    if kind == "garbage_cell":
        for _ in range(draw(st.integers(1, 3))):
            row = rows[draw(st.integers(0, len(rows) - 1))]
            row[draw(st.integers(0, len(row) - 1))] = draw(_cells)
        return _join(rows).encode()
    if kind == "empty":
        return draw(st.sampled_from([b"", b"\n", b"\n\n"]))
    if kind == "delimiter":
        return _join(rows, draw(st.sampled_from([";", "\t", "|", " "]))).encode()
    if kind == "cut":
        data = text.encode()
        return data[: draw(st.integers(0, len(data)))]
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "duplicate_row":
        rows.insert(
            draw(st.integers(1, len(rows))), list(rows[draw(st.integers(1, len(rows) - 1))])
        )
        return _join(rows).encode()
    for row in rows[1:]:  # blank_cells
        row[draw(st.integers(0, len(row) - 1))] = ""
    return _join(rows).encode()


def _is_library_error(error: BaseException) -> bool:
    """A ``ValueError`` raised by ssl_ptx / external_data themselves: exactly ``ValueError``
    or a subclass they define (pandas' ``ParserError`` and ``UnicodeDecodeError`` are
    ``ValueError`` subclasses too, and are not accepted)."""
    module = type(error).__module__.split(".")[0]
    return isinstance(error, ValueError) and (
        type(error) is ValueError or module in ("ssl_ptx", "external_data")
    )


@pytest.mark.parametrize("reader", list(READERS))
def test_valid_files_read(reader: str, tmp_path: Path) -> None:
    read, text = READERS[reader]
    path = tmp_path / "labels.csv"
    path.write_text(text)
    assert len(read(path)) == EXPECTED_ROWS[reader]


# a line with more fields than the header loses the extra ones, with pandas' ParserWarning
@pytest.mark.filterwarnings("ignore::pandas.errors.ParserWarning")
@pytest.mark.parametrize("reader", list(READERS))
def test_mutated_csv_raises_only_the_library_error(
    reader: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    read, text = READERS[reader]
    path = tmp_path_factory.mktemp(reader) / "labels.csv"

    @settings(
        max_examples=CSV_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(mutated(text))
    def check(data: bytes) -> None:
        path.write_bytes(data)
        try:
            table = read(path)
        except Exception as error:  # noqa: BLE001 - the property is about which errors escape
            assert _is_library_error(error), f"{type(error).__name__}: {error}"
            assert str(path) in str(error), f"the error does not name the file: {error}"
            return
        assert isinstance(table, pd.DataFrame)

    check()
