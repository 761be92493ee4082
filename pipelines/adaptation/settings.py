"""The training settings of one adaptation job (`AdaptSettings`): a typed config model, checked on construction.

``site-agent adapt-source|adapt-target --settings FILE`` reads them (flags override the file);
the job records them (`AdaptSettings.to_dict`) in its configuration, whose digest decides
whether a job may resume. Imports neither torch nor MONAI.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Field, ValidationError, ValidatorFunctionWrapHandler, WrapValidator

from fedimg_core.config import ConfigModel, ConfigProblem, format_problems, problems_of, short
from fedimg_core.config_types import integer, number
from fedimg_core.errors import ConfigError
from pipelines.adaptation.config import AdaptConfig
from pipelines.config_fields import ConfigValueError

__all__ = ["SETTINGS_WHERE", "AdaptSettings", "AdaptSettingsError"]

SETTINGS_WHERE = "adaptation settings"  # what messages call the settings by default


class AdaptSettingsError(ConfigError, ValueError):
    """Invalid adaptation settings: every problem as ``<where>: <key.path>: <problem>``.

    A `ConfigError` (``.problems``, ``.key``) that is also a ValueError, as the settings'
    errors always were.
    """


def _settings_error(where: str, problems: list[tuple[str, str]], file: str | None = None) -> AdaptSettingsError:
    """The error listing ``problems`` (key path, problem) of the settings called ``where``."""
    error = AdaptSettingsError(format_problems(where, problems), file=file, key=problems[0][0] if problems else None)
    error.problems = list(problems)
    return error


def _as_given(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    # Checked as a float, kept as given: the settings are part of a job's configuration
    # digest, so a job started with ``mse: 1`` must still read 1 (not 1.0) to resume.
    checked = handler(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else checked


def _rate(minimum: float, maximum: float) -> Any:
    """A number field in ``[minimum, maximum]`` whose Python int stays an int (see `_as_given`).

    Args:
        minimum: smallest value allowed.
        maximum: largest value allowed.

    Returns:
        The metadata, for ``Annotated[float, *_rate(lo, hi)]``.
    """
    return (number(minimum, maximum), WrapValidator(_as_given))


def _few_shot_slice(value: Any) -> Any:
    if value in ("middle", "random") or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"must be 'middle', 'random' or a positive integer (got {short(value)})")


def _perceptual(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"must be the path of a TorchScript perceptual distance, or null for none (got {short(value)})")


def _network(value: Any) -> Any:
    """``network`` is kept as written (the job's digest covers it) and checked as an `AdaptConfig`."""
    try:
        AdaptConfig.from_dict(value, "network")
    except ConfigValueError as exc:
        problems = exc.problems or [("network", str(exc))]
        key, problem = problems[0]
        more = f" (and {len(problems) - 1} more problem(s) in network)" if len(problems) > 1 else ""
        raise ConfigProblem(key.removeprefix("network").lstrip("."), problem + more) from None
    return dict(value) if isinstance(value, Mapping) else value


class AdaptSettings(ConfigModel):
    """One adaptation job's training settings, checked on construction (errors name the key).

    Every field has a default; `from_dict` reads them from a settings file's mapping.

    Raises:
        AdaptSettingsError: (a ValueError) on construction, listing every problem.
    """

    model_config = ConfigDict(frozen=True)  # merged with ConfigModel's

    steps: Annotated[int, integer(1)] = 1000
    batch: Annotated[int, integer(2)] = 8  # batch statistics of the encoder's batch norms need 2
    lr_encoder: Annotated[float, *_rate(1e-8, 1.0)] = 5e-4  # authors: Ranger 1e-4 over 15-20k steps; CPU budgets are ~100x shorter
    lr_branch: Annotated[float, *_rate(1e-8, 1.0)] = 1e-3
    feature_ramp: Annotated[float, *_rate(0.0, 1.0)] = 0.25  # fraction of the steps over which the injection strength s goes 0 -> 1
    foreground_fraction: Annotated[float, *_rate(0.0, 1.0)] = 0.5  # share of each source batch drawn from slices showing a labelled class
    checkpoint_every: Annotated[int, integer(1)] = 100
    log_every: Annotated[int, integer(1)] = 10
    seed: Annotated[int, integer(0)] = 0
    mse: Annotated[float, *_rate(0.0, 100.0)] = 1.0
    ms_ssim: Annotated[float, *_rate(0.0, 100.0)] = 0.8
    perceptual: Annotated[str | None, BeforeValidator(_perceptual)] = None  # TorchScript perceptual distance on disk (LPIPS-like), else none
    val_fraction: Annotated[float, *_rate(0.0, 0.9)] = 0.2  # source jobs: share of labelled cases held out for validation
    n_synthetic: Annotated[int, integer(1)] = 512  # target jobs: synthetic source samples labelled by S_s
    few_shot_volumes: Annotated[int, integer(1)] = 3
    few_shot_slice: Annotated[str | int, BeforeValidator(_few_shot_slice)] = "middle"  # per volume: "middle", "random" or a number of slices
    few_shot_seed: Annotated[int | None, integer(0, optional=True)] = None  # None: the first volumes in dataset order
    latent_samples: Annotated[int, integer(1)] = 4096  # z per domain for the mean latents
    network: Annotated[dict[str, Any] | None, BeforeValidator(_network)] = Field(default_factory=dict)  # AdaptConfig.from_dict input

    def __init__(self, **data: Any) -> None:
        # Direct construction (``AdaptSettings(steps=10)``) reports in fedimg's words, as the
        # dataclass this was did. With a custom __init__ pydantic validates through it (also in
        # model_validate), so `from_dict` calls it rather than `validate_config`, as
        # `pipelines.factory.config.PresetConfig` does.
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _settings_error(SETTINGS_WHERE, problems_of(exc, type(self))) from None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, where: str = SETTINGS_WHERE) -> AdaptSettings:
        """Read settings from a plain mapping (a settings file, with flags merged in).

        Args:
            raw: the mapping (None: every default).
            where: what messages call the settings (a file name, or ``adaptation settings``).

        Returns:
            The settings.

        Raises:
            AdaptSettingsError: (a ValueError) listing every problem as ``<where>: <key>: <problem>``,
                with a "did you mean" for a misspelt key.
        """
        raw = {} if raw is None else raw
        if not isinstance(raw, Mapping):
            raise AdaptSettingsError(f"{where}: expected a mapping of adaptation settings (got {type(raw).__name__})", file=where)
        problems = [(str(key), "unknown key; keys are strings") for key in raw if not isinstance(key, str)]
        if not problems:
            try:
                return cls(**raw)
            except AdaptSettingsError as exc:
                problems = exc.problems
        raise _settings_error(where, problems, file=where) from None

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (what a job's configuration records).

        Returns:
            Every field, ``network`` as given.
        """
        return self.model_dump()

    def adapt_config(self) -> AdaptConfig:
        """The encoder and branch sizes ``network`` describes.

        Returns:
            The `AdaptConfig`.
        """
        return AdaptConfig.from_dict(self.network, "network")

    def feature_scale(self, step: int) -> float:
        """Injection strength at a step: linear 0 -> 1 over ``feature_ramp * steps``.

        Args:
            step: the step, 0-based.

        Returns:
            The strength in (0, 1].
        """
        ramp = self.feature_ramp * self.steps
        return 1.0 if ramp <= 0 else min(1.0, (step + 1) / ramp)
