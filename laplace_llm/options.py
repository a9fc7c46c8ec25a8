"""The K-FAC options of ``subset_of_weights="lora"``, defined once.

:class:`KFACOptions` is the single place where an option, its default, its check and its
help text are written. Everything else derives from it: the keyword arguments of
:class:`~laplace_llm.LoRALaplace` (and its backend :class:`~laplace_llm.curvature.kfac.LoRAKFAC`), the
``options`` of a posterior file's header (:meth:`KFACOptions.to_dict` /
:meth:`KFACOptions.from_dict`), the ``laplace-llm fit`` arguments
(:func:`add_arguments` / :func:`from_arguments`) and the demo's configuration.

Adding an option is one field of :class:`KFACOptions` (with ``metadata=_option(...)``):
its default's type says how it is checked and parsed. Choices are ``str``-valued enums
(``"mc" == FisherType.MC``, and JSON headers hold plain strings); ints are checked
against ``minimum``; bools must be bools (``--flag/--no-flag`` on the command line);
floats must be finite numbers ``≥ minimum`` when one is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import math
import numbers
from collections.abc import Mapping
from typing import Any

__all__ = [
    "Accumulation",
    "FisherType",
    "KFACApprox",
    "Truncation",
    "Evidence",
    "KFACOptions",
    "add_arguments",
    "check_int",
    "expose_options",
    "from_arguments",
    "int_at_least",
]


class FisherType(str, enum.Enum):
    """Which curvature K-FAC approximates (the output-gradient probes)."""

    #: Monte-Carlo Fisher: labels sampled from the model, one backward per sample.
    MC = "mc"
    #: Exact GGN: one backward per class.
    GGN = "ggn"
    #: Empirical Fisher: the observed labels.
    EF = "ef"

    def __str__(self) -> str:
        """Return the plain value (``"mc"``), as the file header and the CLI show it."""
        return self.value


class KFACApprox(str, enum.Enum):
    """How K-FAC treats the sequence axis (Eschenhagen et al., 2023)."""

    #: Every position is a data point.
    EXPAND = "expand"
    #: Positions are collapsed first (inputs averaged, output gradients summed).
    REDUCE = "reduce"

    def __str__(self) -> str:
        """Return the plain value (``"expand"``)."""
        return self.value


class Truncation(str, enum.Enum):
    """What a low-rank factor keeps of the directions its rank ``n_kfac`` discards."""

    #: The discarded trace is spread evenly over the discarded directions (the
    #: probabilistic-PCA remainder): the posterior there is ``τ ρ λ + δ``, not ``δ``.
    ISOTROPIC = "isotropic"
    #: The discarded directions have zero curvature: the prior alone acts there.
    PRIOR = "prior"

    def __str__(self) -> str:
        """Return the plain value (``"isotropic"``)."""
        return self.value


class Accumulation(str, enum.Enum):
    """How a low-rank factor takes in the data during ``fit``."""

    #: A randomized sketch ``Y = F Ω`` (``Ω`` a fixed Gaussian ``d × s`` matrix per factor,
    #: drawn from ``sketch_seed`` and the factor's name), updated per batch by two matrix
    #: products, ``Y += C (Cᵀ Ω)``, and turned into the leading ``n_kfac`` eigenpairs
    #: once, at the end of the fit (the Nyström approximation; Tropp, Yurtsever, Udell &
    #: Cevher, 2017). Exact when the data's rank is at most ``s`` (float32 factors: to
    #: ~1e-4 relative, see :func:`~laplace_llm.matrix.finalise_sketches`); per-batch work
    #: is GEMMs on the layer's device. Half of ``Ω`` is adapted to the first batch's
    #: leading directions (``sketch_adapt``), which makes it as accurate as the
    #: truncation above ``s`` on slowly decaying spectra (BENCHMARKS.md, section 8).
    SKETCH = "sketch"
    #: Incremental truncation: columns are appended and the root is cut back to
    #: ``n_kfac`` columns with a small eigendecomposition every 32 columns.
    TRUNCATE = "truncate"

    def __str__(self) -> str:
        """Return the plain value (``"sketch"``)."""
        return self.value


def default_sketch_size(n_kfac: int) -> int:
    """Sketch columns ``s`` when ``sketch_size`` is 0: ``max(6·n_kfac, 64)`` (96 at 16).

    Tropp et al. (2017) bound the expected nuclear-norm error of the rank-``k`` part of
    a Nyström sketch of ``s`` columns by ``1 + k/(s − k − 1)`` times the best rank-``k``
    error: 1.20 at ``s = 6k``. Measured on real factors (``benchmarks/sketch_accuracy.py``,
    MiniLM and SmolLM2), 96 columns match the incremental truncation's evidence and GLM
    variance errors, where 48 (the truncation's memory) lose about 2× on the evidence.
    Twice the truncation's memory: 1.5 MiB per factor of side 4,096 in float32.
    """
    return max(6 * n_kfac, 64)


class Evidence(str, enum.Enum):
    """Which model's evidence ``log_marginal_likelihood`` (and so ``marglik``) returns.

    Both share the data fit at the fine-tuned weights ``θ*`` and ``log det`` of the
    posterior precision ``P = τH + Λ₀``; they differ in the prior's scatter term (see
    :mod:`laplace_llm.prior.evidence`).
    """

    #: laplace-torch's evidence (the default): the scatter ``dᵀΛ₀d`` at the fine-tuned
    #: weights, ``d = θ* − μ₀``; exact when ``θ*`` is the mode under the prior being
    #: scored (training with that weight decay). ``KronLaplace``'s number and prior.
    MAP = "map"
    #: The evidence of the Gaussian (linearised) model the posterior describes, at that
    #: model's own mode (Antorán et al., 2022, ICML): the scatter
    #: ``min_θ (θ−θ*)ᵀτH(θ−θ*) + (θ−μ₀)ᵀΛ₀(θ−μ₀) = (Λ₀d)ᵀP⁻¹(τHd)``. It assumes a zero
    #: likelihood gradient at ``θ*`` (a MAP trained to convergence without weight
    #: decay). Weights the data do not determine (``τH ≪ Λ₀``) are not charged to the
    #: prior, so marglik picks a tighter prior, often ``δ → ∞`` on small or noisy data.
    LINEARISED = "linearised"

    def __str__(self) -> str:
        """Return the plain value (``"map"``)."""
        return self.value


def _option(help: str, minimum: int | None = None, cli: bool = True) -> dict[str, Any]:
    """Metadata of one :class:`KFACOptions` field.

    Parameters
    ----------
    help : str
        One line for ``--help`` (the default is appended).
    minimum : int or float, optional
        Numeric options: the smallest value allowed.
    cli : bool, default True
        Whether ``laplace-llm fit`` offers the option.
    """
    return {"help": help, "minimum": minimum, "cli": cli}


@dataclasses.dataclass(frozen=True)
class KFACOptions:
    """Options of the LoRA K-FAC curvature, validated on construction.

    Attributes
    ----------
    n_kfac : int, default 16
        Rank kept for factors with side above ``lr_threshold``.
    lr_threshold : int, default 128
        Factors with side ``≤ lr_threshold`` stay dense (the ``r × r`` LoRA side).
    fisher_type : FisherType, default "mc"
        Monte-Carlo Fisher, exact GGN (``C`` backwards) or empirical Fisher.
    mc_samples : int, default 1
        Sampled labels per example of ``fisher_type="mc"``.
    kfac_approx : KFACApprox, default "expand"
        How K-FAC treats the sequence axis.
    truncation : Truncation, default "isotropic"
        What a low-rank factor keeps of the directions it discards.
    share_input_factors : bool, default True
        One input factor for LoRA layers that read the same input.
    evidence : Evidence, default "map"
        The evidence ``log_marginal_likelihood`` returns: laplace-torch's, or the
        linearised model's (see :class:`Evidence`).
    accumulation : Accumulation, default "sketch"
        How low-rank factors take in the data (see :class:`Accumulation`).
    sketch_size : int, default 0
        Columns ``s`` of the sketch; 0 means :func:`default_sketch_size` of ``n_kfac``.
        Must be at least ``n_kfac`` otherwise.
    sketch_seed : int, default 0
        Seed of the sketch's Gaussian test matrices ``Ω``, one per factor, derived from
        this seed and the block's name (:func:`~laplace_llm.matrix.factor_sketch_seed`):
        the fit is deterministic for a given seed, the sketch errors of different
        factors are independent, and every process of a distributed fit draws the same
        ``Ω`` for the same factor.
    sketch_adapt : int, default -1
        Columns of each factor's ``Ω`` replaced by the leading directions of the
        factor's first batch, the leading left singular vectors of its sketch with the
        Gaussian ``Ω`` (a randomised range finder;
        :meth:`~laplace_llm.matrix.LowRankFactor.adapt_omega_`);
        -1 means half the sketch, 0 keeps ``Ω`` Gaussian. Must be below the sketch's
        columns. On slowly decaying spectra of rank above ``s`` it brings the kept
        eigenvalues and the evidence within the incremental truncation's errors
        (BENCHMARKS.md, section 8). A distributed fit keeps ``Ω`` Gaussian, so that the
        processes' sketches add up.
    sketch_readapt : bool, default True
        Adapt those columns of ``Ω`` again halfway through the fit's batches, to the
        leading directions of the data so far
        (:func:`~laplace_llm.matrix.factor.readapt_sketches`): one decomposition per
        factor more, whatever the number of tokens. It lowered the log-evidence error
        against the exact factors on MiniLM (3.45e-3 to 3.28e-3), SmolLM2 (9.46e-4 to
        8.49e-4) and the wide Llama of issue 31 (from 1.05× the incremental truncation's
        to 0.995×, and over 24 draws of that Llama from 1.9 % above the truncation's on
        average to 1.2 % below; BENCHMARKS.md, sections 5 and 8). Needs ``sketch_adapt``
        and a loader with a length of at least two batches; off in a distributed fit,
        with ``sketch_adapt``.

    Raises
    ------
    ValueError
        An integer below its minimum (or not an integer), or an unknown choice.
    """

    n_kfac: int = dataclasses.field(
        default=16,
        metadata=_option("rank kept for Kronecker factors larger than --lr-threshold", 1),
    )
    lr_threshold: int = dataclasses.field(
        default=128, metadata=_option("factors of side ≤ this are kept dense", 0)
    )
    fisher_type: FisherType = dataclasses.field(
        default=FisherType.MC,
        metadata=_option(
            "curvature: Monte-Carlo Fisher (one backward per sample), exact GGN (one "
            "backward per class) or empirical Fisher"
        ),
    )
    mc_samples: int = dataclasses.field(
        default=1, metadata=_option("sampled labels per example of --fisher-type mc", 1)
    )
    kfac_approx: KFACApprox = dataclasses.field(
        default=KFACApprox.EXPAND,
        metadata=_option("how K-FAC treats the sequence axis"),
    )
    truncation: Truncation = dataclasses.field(
        default=Truncation.ISOTROPIC,
        metadata=_option(
            "directions a low-rank factor discards: keep their mean eigenvalue "
            "(isotropic) or leave them to the prior"
        ),
    )
    share_input_factors: bool = dataclasses.field(
        default=True,
        metadata=_option(
            "one input factor for LoRA layers that read the same input (q/k/v, gate/up)"
        ),
    )
    evidence: Evidence = dataclasses.field(
        default=Evidence.MAP,
        metadata=_option(
            "the evidence marglik maximises: laplace-torch's, with the prior charged at "
            "the fine-tuned weights (map), or that of the linearised model at its own "
            "mode (linearised; Antorán et al. 2022, for a MAP trained without weight decay)"
        ),
    )

    accumulation: Accumulation = dataclasses.field(
        default=Accumulation.SKETCH,
        metadata=_option(
            "how low-rank factors take in the data: a randomized sketch updated by matrix "
            "products and decomposed once (sketch), or incremental truncation (truncate)"
        ),
    )
    sketch_size: int = dataclasses.field(
        default=0,
        metadata=_option("columns of the sketch (0: max(6 n_kfac, 64))", 0),
    )
    sketch_seed: int = dataclasses.field(
        default=0, metadata=_option("seed of the sketch's Gaussian test matrix", 0)
    )
    sketch_adapt: int = dataclasses.field(
        default=-1,
        metadata=_option(
            "columns of the sketch's test matrix taken from the first batch's leading "
            "directions (-1: half the sketch; 0: all Gaussian)", -1),
    )
    sketch_readapt: bool = dataclasses.field(
        default=True,
        metadata=_option(
            "adapt those columns again halfway through the fit's batches, to the leading "
            "directions of the data so far"),
    )

    def __post_init__(self) -> None:
        """Check every field and convert choices to their enums."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            enum_type = _enum_of(field)
            minimum = field.metadata.get("minimum")
            if enum_type is not None:
                value = _check_choice(field.name, value, enum_type)
            elif isinstance(field.default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"{field.name} must be True or False; got {value!r}.")
            elif isinstance(field.default, int):
                value = check_int(field.name, value, 0 if minimum is None else minimum)
            elif isinstance(field.default, float):
                value = _check_float(field.name, value, minimum)
            object.__setattr__(self, field.name, value)
        if 0 < self.sketch_size < self.n_kfac:
            raise ValueError(
                f"sketch_size={self.sketch_size} is below n_kfac={self.n_kfac}: the sketch "
                "cannot hold the rank it keeps. Use sketch_size ≥ n_kfac, or 0 for the "
                f"default ({default_sketch_size(self.n_kfac)} here)."
            )
        s = self.sketch_columns
        if s and self.sketch_adapt >= s:
            raise ValueError(
                f"sketch_adapt={self.sketch_adapt} must be below the sketch's {s} columns: "
                "some of Ω's columns stay Gaussian, so that a factor of rank ≤ s is held "
                "exactly. Use -1 (half the sketch) or a smaller number."
            )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Names of the options, in definition order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """Return the options as plain JSON values (enums as their strings)."""
        return {
            name: value.value if isinstance(value, enum.Enum) else value
            for name, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> KFACOptions:
        """Options from a mapping; keys that are no option are ignored, missing ones default.

        Parameters
        ----------
        values : Mapping
            e.g. a posterior file's ``options`` or a configuration's fields.
        """
        names = cls.names()
        return cls(**{k: v for k, v in values.items() if k in names})

    @property
    def sketch_columns(self) -> int | None:
        """Columns of the sketch of a low-rank factor, or ``None`` for incremental truncation."""
        if self.accumulation != Accumulation.SKETCH:
            return None
        return self.sketch_size or default_sketch_size(self.n_kfac)

    @property
    def sketch_adapt_columns(self) -> int:
        """Columns of each sketch's ``Ω`` taken from the data (0 without a sketch)."""
        s = self.sketch_columns
        if not s:
            return 0
        return s // 2 if self.sketch_adapt < 0 else self.sketch_adapt

    def replace(self, **changes: Any) -> KFACOptions:
        """Return a copy with some options changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _enum_of(field: dataclasses.Field) -> type[enum.Enum] | None:
    default = field.default
    return type(default) if isinstance(default, enum.Enum) else None


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an ``int`` if it is an integer ``≥ minimum`` (not a bool), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}; got {value!r}.")
    return int(value)


def _check_float(name: str, value: Any, minimum: float | None) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" ≥ {minimum}"
        raise ValueError(f"{name} must be a finite number{bound}; got {value!r}.")
    return float(value)


def _check_choice(name: str, value: Any, choices: type[enum.Enum]) -> enum.Enum:
    try:
        return choices(value)
    except ValueError:
        allowed = tuple(c.value for c in choices)
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}.") from None


def expose_options(cls: type) -> type:
    """Class decorator: one read-only attribute per option, read from ``self.options``.

    So ``la.n_kfac`` and ``backend.fisher_type`` keep working, and a new option needs no
    line in the classes that hold a :class:`KFACOptions`.
    """
    for name in KFACOptions.names():
        setattr(cls, name, property(lambda self, _name=name: getattr(self.options, _name),
                                    doc=f"``self.options.{name}`` (see :class:`KFACOptions`)."))
    return cls


# ------------------------------------------------------------------ command line
def int_at_least(minimum: int):
    """Return an argparse type accepting integers ``≥ minimum``."""
    what = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    options_type: type[KFACOptions] = KFACOptions,
) -> None:
    """Add one ``--option-name`` argument per :class:`KFACOptions` field to ``parser``.

    Defaults, choices and the integer ranges come from the dataclass
    (``options_type``, a subclass in tests); read the parsed values back with
    :func:`from_arguments`.
    """
    for field in dataclasses.fields(options_type):
        meta = field.metadata
        if not meta.get("cli", True):
            continue
        flag = "--" + field.name.replace("_", "-")
        enum_type = _enum_of(field)
        default = field.default.value if enum_type is not None else field.default
        help_text = f"{meta['help']} (default: {default})"
        if enum_type is not None:
            parser.add_argument(
                flag, choices=tuple(c.value for c in enum_type), default=default,
                help=help_text,
            )
        elif isinstance(default, bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif isinstance(default, int):
            parser.add_argument(
                flag, type=int_at_least(meta["minimum"] or 0), default=default,
                metavar="N", help=help_text,
            )
        else:
            parser.add_argument(flag, type=float, default=default, metavar="X", help=help_text)


def from_arguments(
    args: argparse.Namespace, options_type: type[KFACOptions] = KFACOptions
) -> KFACOptions:
    """Return the :class:`KFACOptions` of arguments added by :func:`add_arguments`."""
    return options_type.from_dict(vars(args))
