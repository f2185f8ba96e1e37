"""Discovering the samples of anomaly-detection datasets.

Four layouts are understood, each turned into a flat, sorted list of :class:`Sample`:

* ``mvtec``: ``<root>/<category>/train/good/*``, ``<root>/<category>/test/<type>/*`` (``good`` is normal) and masks
  ``<root>/<category>/ground_truth/<type>/<stem>_mask.<ext>`` (or ``<stem>.<ext>``);
* ``visa``: ``<root>/split_csv/1cls.csv`` listing every image and mask relative to the root;
* ``btad``: ``<root>/<category>/train/ok``, ``test/ok``, ``test/ko`` and masks ``ground_truth/ko/<stem>.<ext>``;
* ``jsonl``: the UniAD/OneNIP JSON-lines metadata (``train.json`` / ``test.json``), one object per line.

:func:`read_source` reads one ``[FORMAT:]PATH`` spec, :func:`read_sources` merges several into one unified set.
The readers look at file names only; :func:`validate_samples` then decodes every image and mask (with
:mod:`onenip.data.images`) and reports, or with ``skip_bad`` skips, the unusable ones.

Folders assembled by hand: a folder that cannot be listed, a file where a folder is expected and a category without
training images are DatasetErrors naming them; file names may hold any characters the file system allows (non-ASCII,
spaces, even bytes that are not UTF-8); a symbolic link to a missing file is listed like an image and reported by
:func:`validate_samples` as a broken link; a folder named like an image (``x.png``) is not an image and is ignored.

The package's modules, in the order a spec is read: ``sources`` (format detection, several roots, the decoding
check), ``folders`` (the folder layouts: MVTec AD, BTAD), ``listed`` (the formats that list their files: VisA, JSON
lines), and ``files`` (:class:`Sample` and the file-system helpers the readers share).
"""

from onenip.data.files import FORMATS, IMAGE_EXTENSIONS, MAX_LISTED_PROBLEMS, SPLITS, Sample, group_by_category
from onenip.data.folders import read_btad, read_mvtec
from onenip.data.listed import read_jsonl, read_visa
from onenip.data.sources import detect_format, load_split, read_source, read_sources, validate_samples

__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "MAX_LISTED_PROBLEMS",
    "SPLITS",
    "Sample",
    "detect_format",
    "group_by_category",
    "load_split",
    "read_btad",
    "read_jsonl",
    "read_mvtec",
    "read_source",
    "read_sources",
    "read_visa",
    "validate_samples",
]
