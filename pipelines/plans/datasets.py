"""Fed-BioMed dataset adapter for prepared datasets (the node registers them as 'custom')."""

from __future__ import annotations

from fedbiomed.common.dataset import CustomDataset

from pipelines.segmentation import preprocess_case
from preprocessing.dataset import load_dataset


class PreparedSegmentationDataset(CustomDataset):
    """Labelled cases of a prepared dataset, preprocessed once and kept in memory.

    `self.path` is set by the node from its dataset registry; the plan never sees it.
    """

    def read(self) -> None:
        prepared = load_dataset(self.path)
        self._items = [preprocess_case(str(c.image), str(c.label)) for c in prepared.cases if c.label is not None]

    def get_item(self, index):
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)
