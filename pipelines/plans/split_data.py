"""The segmentation plans' data manager: Fed-BioMed's loaders over the site's case split.

Fed-BioMed's Round calls ``training_data()`` -> ``extend_loader_args`` -> ``load`` ->
``load_dataset`` -> ``load_state`` -> ``split(test_ratio, ...)`` -> ``save_state`` on the data
manager the plan returns. `CaseSplitDataManager` keeps that sequence and Fed-BioMed's own
TorchDataManager classes (subsets, loaders; pinned 6.4.1) but replaces its random
``test_ratio`` split by the case split of `pipelines.splits`: the training loader covers the
training cases, Fed-BioMed's testing loader the validation cases, and `test_loader` the test
cases (the plan scores them next to validation, through `test_cases` with their positions in the dataset;
they never reach a training batch). The split
is recomputed from the case ids every round, so the state Fed-BioMed saves between rounds
cannot move a case. Which case is in which split is written to ``$FEDIMG_SPLITS_DIR/<run id>.json``
(the site agent points it at ``<work>/splits``, outside the cache staff may clear), else
``$FEDIMG_CACHE_DIR/splits/``; case ids never leave the site, and a record that cannot be written
is logged, not fatal to the round.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fedbiomed.common.constants import ErrorNumbers, TrainingPlans
from fedbiomed.common.datamanager import DataManager, TorchDataManager
from fedbiomed.common.dataset import Dataset
from fedbiomed.common.dataset_types import DataReturnFormat
from fedbiomed.common.exceptions import FedbiomedError

from fedimg_core import atomic
from pipelines.site_errors import site_boundary
from pipelines.splits import SPLITS, SplitIndices, SplitSettings, split_indices

__all__ = ["CaseSplitDataManager", "split_record_path", "write_split_record"]

NO_RUN_ID = "no-run-id"
SPLITS_DIR_ENV = "FEDIMG_SPLITS_DIR"

log = logging.getLogger(__name__)


def split_records_dir() -> Path | None:
    """The folder of the site's split records: ``$FEDIMG_SPLITS_DIR``, else ``$FEDIMG_CACHE_DIR/splits``, else None."""
    if folder := os.environ.get(SPLITS_DIR_ENV):
        return Path(folder)
    cache_dir = os.environ.get("FEDIMG_CACHE_DIR")
    return Path(cache_dir) / "splits" if cache_dir else None


def split_record_path(folder: str | os.PathLike[str], run_id: str | None) -> Path:
    """Where a site keeps the record of a run's split.

    Args:
        folder: the site's split records folder (`split_records_dir`).
        run_id: the run (a plain name, checked with the plan arguments); None: ``no-run-id``.

    Returns:
        ``<folder>/<run_id>.json``.
    """
    return Path(folder) / f"{run_id or NO_RUN_ID}.json"


def write_split_record(path: str | os.PathLike[str], settings: SplitSettings, case_ids: Sequence[str], indices: SplitIndices) -> None:
    """Write which case is in which split, atomically (the site's own record; never sent).

    Args:
        path: the record file (`split_record_path`).
        settings: the split settings applied.
        case_ids: the dataset's case ids, in item order.
        indices: the split, as positions into `case_ids`.
    """
    cases = {name: [case_ids[i] for i in getattr(indices, name)] for name in SPLITS}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, {"split": settings.to_dict(), "cases": cases})


class _CaseSplitTorchDataManager(TorchDataManager):  # type: ignore[misc]  # Fed-BioMed ships no types: its classes are Any
    """Fed-BioMed's TorchDataManager with the case split instead of its random one."""

    def __init__(self, dataset: Dataset, settings: SplitSettings | None, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self._settings = settings
        self.indices: SplitIndices | None = None
        self.applied: SplitSettings | None = None
        self._subset_holdout: Any = None  # the test cases' subset

    def split(self, test_ratio: float, test_batch_size: int | None, is_shuffled_testing_dataset: bool = False) -> tuple[Any, Any]:
        """Training and validation loaders over the case split (Fed-BioMed's random split is not used).

        Args:
            test_ratio: Fed-BioMed's share for testing. With split settings it only switches Fed-BioMed's testing
                on or off: the settings alone decide which cases train, so the held-out cases never train (fail
                closed). Without settings (a coordinator from before the three-way split) it is the validation
                share, as it was then, and there is no test split.
            test_batch_size: the validation loader's batch size (None: all validation cases).
            is_shuffled_testing_dataset: ignored: the split is a function of the case ids, never reshuffled.

        Returns:
            (training loader, validation loader); None for an empty split.

        Raises:
            FedbiomedError: the dataset has no case ids for its items, or a bad argument.
        """
        if test_batch_size is not None and (isinstance(test_batch_size, bool) or not isinstance(test_batch_size, int)):
            raise FedbiomedError(f"{ErrorNumbers.FB632.value}: test_batch_size must be an integer or None (got {type(test_batch_size).__name__})")
        if isinstance(test_ratio, bool) or not isinstance(test_ratio, (int, float)) or not 0 <= test_ratio <= 1:
            raise FedbiomedError(f"{ErrorNumbers.FB632.value}: test_ratio must be a number in [0, 1] (got {test_ratio!r})")
        wrapped = self._dataset_wrapper(self._dataset)
        case_ids = list(getattr(self._dataset, "case_ids", []))
        if len(case_ids) != len(wrapped):
            raise FedbiomedError(f"{ErrorNumbers.FB632.value}: the dataset gives {len(case_ids)} case ids for {len(wrapped)} items")
        self.applied = self._settings if self._settings is not None else SplitSettings(validation=float(test_ratio), test=0.0, seed=0)
        self.indices = split_indices(case_ids, self.applied)
        self._subset_train = self._subset_class(wrapped, self.indices.training)
        self._subset_test = self._subset_class(wrapped, self.indices.validation) if self.indices.validation else None
        self._subset_holdout = self._subset_class(wrapped, self.indices.test) if self.indices.test else None
        # what save_state hands Fed-BioMed to keep between rounds (this split never reads it back)
        self._training_index = list(self.indices.training)
        self._testing_index = list(self.indices.validation)
        self._test_ratio = test_ratio
        loader_args = {"shuffle": True, **self._loader_arguments}
        return (
            self._subset_loader(self._subset_train, **loader_args),
            self._subset_loader(self._subset_test, batch_size=test_batch_size or len(self.indices.validation)),
        )

    def test_loader(self) -> Any:
        """The test cases' loader, one case per batch (None without test cases or before `split`)."""
        return self._subset_loader(self._subset_holdout, batch_size=1)


class CaseSplitDataManager(DataManager):  # type: ignore[misc]  # Fed-BioMed ships no types: its classes are Any
    """Fed-BioMed's DataManager for a torch plan, splitting the site's cases by `pipelines.splits`.

    Args:
        dataset: a Fed-BioMed dataset with ``case_ids`` aligned with its items once loaded
            (`pipelines.plans.datasets.PreparedSegmentationDataset`).
        settings: the split shares and seed (``plan_args.split``); None when the coordinator sent none
            (then Fed-BioMed's ``test_ratio`` is the validation share, as before the three-way split).
        run_id: the run, naming the site's split record (None: ``no-run-id``).
        kwargs: loader arguments, as Fed-BioMed's DataManager takes them.
    """

    def __init__(self, dataset: Dataset, settings: SplitSettings | None, run_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self._settings = settings
        self._run_id = run_id

    def load(self, tp_type: TrainingPlans) -> None:
        """Build the framework data manager (torch plans only).

        Args:
            tp_type: the plan's type, as Fed-BioMed's Round passes it.

        Raises:
            FedbiomedError: a plan type other than TorchTrainingPlan.
        """
        if tp_type != TrainingPlans.TorchTrainingPlan:
            raise FedbiomedError(f"{ErrorNumbers.FB632.value}: the case split serves torch training plans only (got {tp_type})")
        self._data_manager_instance = _CaseSplitTorchDataManager(dataset=self._dataset, settings=self._settings, **self._loader_arguments)

    def load_dataset(self, **kwargs: Any) -> None:
        """Read the dataset in torch format (Fed-BioMed's own maps only its classes to a format).

        Args:
            kwargs: the node's dataset arguments (``root``...), passed to the dataset's ``load``.

        Raises:
            FedbiomedError: `load` was not called, or the dataset could not be read.
        """
        self._manager()
        try:
            self._dataset.load(**kwargs, to_format=DataReturnFormat.TORCH)
        except FedbiomedError:
            raise
        except Exception as exc:
            raise FedbiomedError(f"{ErrorNumbers.FB632.value}: Unable to complete dataset initialization.") from exc

    @site_boundary("data")
    def split(self, test_ratio: float, test_batch_size: int | None, is_shuffled_testing_dataset: bool = False) -> tuple[Any, Any]:
        """Split the cases, write the site's record, return Fed-BioMed's two loaders.

        Args:
            test_ratio: Fed-BioMed's testing share (0: no testing, every case trains).
            test_batch_size: the validation loader's batch size (None: all validation cases).
            is_shuffled_testing_dataset: ignored (the split never reshuffles).

        Returns:
            (training loader over the training cases, validation loader or None).

        Raises:
            SiteError: any failure (`pipelines.site_errors`), e.g. `split` before `load`.
        """
        manager = self._manager()
        loaders = manager.split(test_ratio, test_batch_size, is_shuffled_testing_dataset)
        folder = split_records_dir()
        if folder is not None and manager.applied is not None and manager.indices is not None:
            target = split_record_path(folder, self._run_id)
            try:
                write_split_record(target, manager.applied, list(self._dataset.case_ids), manager.indices)
            except OSError as exc:  # the record is for the site's staff; the round does not depend on it
                log.warning("could not write the split record %s: %s", target, exc.strerror or exc)
        return loaders

    @property
    def indices(self) -> SplitIndices | None:
        """The positions of each split's cases (None before `split`)."""
        manager = self._loaded()
        return manager.indices if manager is not None else None

    def test_loader(self) -> Any:
        """The test cases' loader, one case per batch (None without test cases or before `split`)."""
        manager = self._loaded()
        return manager.test_loader() if manager is not None else None

    def test_cases(self) -> Iterator[tuple[int, Any, Any]]:
        """The test cases one by one, with their positions in the dataset (nothing without test cases or before `split`).

        The plan needs each test case's position to fetch what the dataset holds beside the loader's items
        (its reference label: `pipelines.plans.datasets.PreparedSegmentationDataset.reference_label`).

        Yields:
            ``(index, image, label)``: the case's position in the dataset (as in ``indices.test``) and the
            test loader's item, batch dimension removed.

        Raises:
            FedbiomedError: the test loader gives another number of cases than the test split holds.
        """
        loader, indices = self.test_loader(), self.indices
        if loader is None or indices is None:
            return
        batches = iter(loader)  # one case per batch, in the order of indices.test (the loader never shuffles)
        for index in indices.test:
            batch = next(batches, None)
            if batch is None:
                raise FedbiomedError(f"{ErrorNumbers.FB632.value}: the test loader ran out before the {len(indices.test)} test cases")
            data, target = batch
            yield index, data[0], target[0]
        if next(batches, None) is not None:
            raise FedbiomedError(f"{ErrorNumbers.FB632.value}: the test loader gives more cases than the {len(indices.test)} test cases")

    def _loaded(self) -> _CaseSplitTorchDataManager | None:
        manager = self.__dict__.get("_data_manager_instance")  # not through __getattr__, which Fed-BioMed forwards
        return manager if isinstance(manager, _CaseSplitTorchDataManager) else None

    def _manager(self) -> _CaseSplitTorchDataManager:
        manager = self._loaded()
        if manager is None:
            raise FedbiomedError(f"{ErrorNumbers.FB632.value}: the data manager is not loaded: call load() first")
        return manager
