"""Fed-BioMed dataset adapter for prepared datasets (the node registers them as 'custom')."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fedbiomed.common.dataset import CustomDataset

from pipelines.segmentation import preprocess_case, random_patch
from preprocessing.dataset import load_dataset

# The node builds a new dataset object every round; the preprocessed cases are kept for the
# life of the node process, keyed by the manifest's content, so a changed dataset is re-read.
_CACHE: dict[tuple[str, str], list] = {}
_CACHE_MAX_BYTES = 4 * 1024**3


def _cached_items(path: str) -> list:
    key = (str(Path(path).resolve()), hashlib.sha256((Path(path) / "manifest.json").read_bytes()).hexdigest())
    if key not in _CACHE:
        prepared = load_dataset(path)
        items = [preprocess_case(str(c.image), str(c.label)) for c in prepared.cases if c.label is not None]
        if sum(t.element_size() * t.numel() for pair in items for t in pair) > _CACHE_MAX_BYTES:
            return items  # too large to keep in memory: re-read next round
        _CACHE.clear()  # one dataset per node process in practice; never grow without bound
        _CACHE[key] = items
    return _CACHE[key]


class PreparedSegmentationDataset(CustomDataset):
    """Labelled cases of a prepared dataset, preprocessed once per node process.

    `self.path` is set by the node from its dataset registry; the plan never sees it.
    `roi_size`, set by the plan before the node loads the dataset, makes every sample a
    fixed-size random patch (cases of different shapes can then share a batch).
    """

    roi_size = None

    def read(self) -> None:
        self._items = _cached_items(self.path)

    def get_item(self, index):
        image, label = self._items[index]
        if self.roi_size is not None:
            return random_patch(image, label, self.roi_size)
        return image, label

    def __len__(self) -> int:
        return len(self._items)
