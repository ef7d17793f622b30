"""What a report says: the paper's findings, the numbers that speak to them, their uncertainty, and a verdict.

Each analysis states its own findings (``Analysis.findings``) and notices its own events over training
(``Analysis.events``), from probes it reads here as :class:`Evidence`: one side (a run, or seeds of one setup) or two
(A against B). Every number comes with a 95 % interval from Student's t on the right degrees of freedom: the block
jackknife's ``M - 1`` over a run's ``M`` probe minibatches, or ``n - 1`` over ``n`` seeds. A verdict comes from a fixed
vocabulary, with its reason, by criteria that each analysis declares (:class:`Criterion`) and a user can override.
Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_cka.figures.spec import Figure
from lightning_cka.stats import detectable_difference, t_critical, welch_test

if TYPE_CHECKING:
    from lightning_cka.result import CKAResult

SHOWS, PARTLY, DOES_NOT, CANNOT_TELL, NOT_MEASURED = "shows", "partly", "does not show", "cannot tell", "not measured"
VERDICTS = (SHOWS, PARTLY, DOES_NOT, CANNOT_TELL, NOT_MEASURED)
LEVEL = 0.95  # every interval of a report


@dataclass(frozen=True)
class Criterion:
    """A threshold a verdict or an event rests on, with its default and what it means.

    Attributes:
        key: its name within its analysis (``far_cka``); reports and the CLI name it ``<analysis>.<key>``.
        default: its value unless overridden.
        doc: what it is compared with, in a sentence.
    """

    key: str
    default: float
    doc: str


@dataclass(frozen=True)
class Estimate:
    """A number with its 95 % interval.

    Attributes:
        value: the estimate.
        half: half the width of its interval (``t · se``); NaN when unknown.
        basis: what the interval rests on (``"jackknife over 8 minibatches"``, ``"3 seeds, sd 0.021"``).
    """

    value: float
    half: float = float("nan")
    basis: str = ""

    @property
    def low(self) -> float:
        """The interval's lower end."""
        return self.value - self.half

    @property
    def high(self) -> float:
        """The interval's upper end."""
        return self.value + self.half

    def versus(self, threshold: float) -> int:
        """+1 when the whole interval is above ``threshold``, -1 when below, 0 when it holds it or is unknown.

        Example:
            >>> Estimate(0.8, 0.05).versus(0.5), Estimate(0.52, 0.05).versus(0.5), Estimate(0.3, 0.05).versus(0.5)
            (1, 0, -1)
        """
        if not math.isfinite(self.value):
            return 0
        if not math.isfinite(self.half):  # no uncertainty known: the value alone decides
            return 1 if self.value > threshold else -1 if self.value < threshold else 0
        return 1 if self.low > threshold else -1 if self.high < threshold else 0

    def percent(self, basis: bool = False) -> str:
        """A share as ``12 % ± 5 %`` (``0 %``, ``100 %``)."""
        scaled = Estimate(100 * self.value, 100 * self.half, self.basis)
        return scaled.text(0, " %", basis)

    def text(self, digits: int = 3, unit: str = "", basis: bool = False) -> str:
        """``0.812 ± 0.014`` (the interval's half-width; ``0.812`` without one; ``-`` for NaN), with its basis."""
        if not math.isfinite(self.value):
            return "-"
        value = f"{self.value:.{digits}f}{unit}"
        text = f"{value} ± {self.half:.{digits}f}{unit}" if math.isfinite(self.half) else value
        return f"{text} ({self.basis})" if basis and self.basis else text


@dataclass
class Finding:
    """One finding of the paper as these probes speak to it.

    Attributes:
        key: ``<analysis>.<finding>``, stable across versions (``cka.structure``).
        title: the finding in a few words.
        paper: what Raghu et al. 2021 found.
        verdict: one of :data:`VERDICTS`.
        reason: why this verdict, with the numbers that decided it.
        statement: what these probes show, in a sentence or two.
        numbers: ``(quantity, value with its interval and basis)`` rows.
        figures: figure specs that show it.
        needs: when not measured or undecided: which option or run would decide it.
        side: the side (group) it is about, when the report has two.
    """

    key: str
    title: str
    paper: str
    verdict: str
    reason: str
    statement: str = ""
    numbers: list[tuple[str, str]] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    needs: str = ""
    side: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}.")


@dataclass(frozen=True)
class Event:
    """A moment of training worth being told about.

    Attributes:
        step: the probe where it was noticed.
        analysis: the analysis that noticed it.
        kind: a short key (``head_became_local``).
        text: one sentence, with the evidence that triggered it.
        subject: what it is about (a layer, a head).
    """

    step: int
    analysis: str
    kind: str
    text: str
    subject: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready builtins (probe files store their events)."""
        return {
            "step": self.step,
            "analysis": self.analysis,
            "kind": self.kind,
            "text": self.text,
            "subject": self.subject,
        }


@dataclass
class RunProbes:
    """The probes of one run by step."""

    label: str
    probes: Mapping[int, CKAResult]

    @property
    def steps(self) -> list[int]:
        """Its probed steps, in order."""
        return sorted(self.probes)

    @property
    def last(self) -> CKAResult:
        """Its last probe."""
        return self.probes[self.steps[-1]]

    def history(self) -> list[CKAResult]:
        """Every probe, in order of step."""
        return [self.probes[step] for step in self.steps]


@dataclass
class Side:
    """One side of a report: a run, or the runs (seeds) of one setup."""

    label: str
    runs: list[RunProbes]

    @property
    def last(self) -> list[CKAResult]:
        """Each run's last probe."""
        return [run.last for run in self.runs]


class Criteria:
    """The criteria in force: the analyses' defaults, with overrides by ``"<analysis>.<key>"``.

    Args:
        overrides: values by ``"<analysis>.<key>"`` (``{"cka.far_alike": 0.6}``).
        analyses: the analyses whose criteria may be overridden; an override naming none of theirs is an error.

    Raises:
        ValueError: an override that names no criterion of these analyses (the message lists them), or a value that
            is not a finite number.

    Example:
        >>> from lightning_cka.analyses import LayerCKA
        >>> Criteria({"cka.far_alike": 0.6}, [LayerCKA()]).value(LayerCKA(), "far_alike")
        0.6
    """

    def __init__(self, overrides: Mapping[str, float] | None = None, analyses: Sequence[Any] = ()) -> None:
        self.overrides = dict(overrides or {})
        known = {f"{a.name}.{c.key}" for a in analyses for c in a.criteria}
        for name, value in self.overrides.items():
            if analyses and name not in known:
                raise ValueError(
                    f"no criterion {name!r}; the criteria are {', '.join(sorted(known)) or 'none'} (docs/report.md)."
                )
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"criterion {name} must be a finite number, got {value!r}.")

    def value(self, analysis: Any, key: str) -> float:
        """The value of ``analysis``'s criterion ``key``: the override, else its default."""
        name = f"{analysis.name}.{key}"
        if name in self.overrides:
            return float(self.overrides[name])
        return next(c.default for c in type(analysis).criteria if c.key == key)

    def table(self, analyses: Sequence[Any]) -> list[tuple[str, float, float, str]]:
        """``(name, value in force, default, doc)`` of every criterion of ``analyses``, for a report's appendix."""
        return [
            (f"{a.name}.{c.key}", self.value(a, c.key), c.default, c.doc) for a in analyses for c in type(a).criteria
        ]


@dataclass
class Evidence:
    """What a report reads: one or two sides, and the criteria in force.

    Attributes:
        sides: one side (a run or seeds of one setup), or two (A against B).
        criteria: the criteria in force.
        level: the interval level (0.95).
        alpha: the significance level of tests, and the false discovery rate of group tests.
    """

    sides: list[Side]
    criteria: Criteria = field(default_factory=Criteria)
    level: float = LEVEL
    alpha: float = 0.05

    def criterion(self, analysis: Any, key: str) -> float:
        """The value of ``analysis``'s criterion ``key`` in force."""
        return self.criteria.value(analysis, key)

    @property
    def paired(self) -> bool:
        """Two sides, A against B."""
        return len(self.sides) == 2


def replicate_estimate(value: float, replicates: Sequence[float], level: float = LEVEL) -> Estimate:
    """``value`` with the interval of its block jackknife, from its leave-one-minibatch-out ``replicates``.

    Student's t on ``M - 1`` degrees of freedom for ``M`` replicates (the jackknife is calibrated so; ``± 1.96 se``
    covers 66-73 % at ``M = 2``).

    Example:
        >>> replicate_estimate(0.8, [0.7, 0.9, 0.8]).text()
        '0.800 ± 0.497'
    """
    reps = np.asarray(replicates, dtype=np.float64)
    if reps.size < 2 or not np.isfinite(reps).all():
        return Estimate(value, float("nan"), "one minibatch: no standard error" if reps.size < 2 else "")
    m = reps.size
    se = float(np.sqrt((m - 1) / m * np.square(reps - reps.mean()).sum()))
    return Estimate(value, float(t_critical(level, m - 1)) * se, f"jackknife over {m} minibatches")


def jackknife_estimate(
    result: CKAResult, summary: Callable[[np.ndarray], float], matrix: str, replicates: str, level: float = LEVEL
) -> Estimate:
    """``summary`` of one probe's matrix with its jackknife interval (t on ``M - 1`` degrees of freedom).

    Example:
        >>> from lightning_cka.result import CKAResult
        >>> r = CKAResult(layers=["a"], intra=np.array([[0.8]]), intra_replicates=np.array([[[0.7]], [[0.9]], [[0.8]]]))
        >>> jackknife_estimate(r, lambda m: float(m[0, 0]), "intra", "intra_replicates").text()
        '0.800 ± 0.497'
    """
    values = result.get(matrix)
    if values is None:
        return Estimate(float("nan"))
    value = float(summary(np.asarray(values, dtype=np.float64)))
    reps = result.get(replicates)
    return replicate_estimate(value, [summary(r) for r in np.asarray(reps if reps is not None else [])], level)


def seed_estimate(values: Sequence[float], level: float = LEVEL) -> Estimate:
    """The mean of per-seed values with its interval over seeds (t on ``n - 1`` degrees of freedom).

    Example:
        >>> seed_estimate([0.80, 0.82, 0.84]).text()
        '0.820 ± 0.050'
    """
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if not finite.size:
        return Estimate(float("nan"))
    if finite.size < 2:
        return Estimate(float(finite[0]), float("nan"), "one run: seed variation unknown")
    sd = float(finite.std(ddof=1))
    half = float(t_critical(level, finite.size - 1)) * sd / math.sqrt(finite.size)
    return Estimate(float(finite.mean()), half, f"{finite.size} seeds, sd {sd:.3g}")


def side_estimate(side: Side, per_run: Callable[[CKAResult], Estimate], level: float = LEVEL) -> Estimate:
    """A side's estimate: one run's own interval, or the mean over its seeds with the interval over seeds.

    Runs that agree exactly (the frozen reference, measured on the same probe in every seed) keep the first run's own
    interval: seeds that do not vary say nothing about the uncertainty.
    """
    estimates = [per_run(result) for result in side.last]
    values = [e.value for e in estimates]
    if len(estimates) == 1 or all(v == values[0] for v in values):
        return estimates[0]
    return seed_estimate(values, level)


def threshold_verdict(estimate: Estimate, threshold: float, above: bool, what: str) -> tuple[str, str]:
    """``(verdict, reason)`` for "``what`` is above (or below) ``threshold``": shows, does not show, or cannot tell.

    Shows when the whole interval is strictly beyond the threshold, does not show when the whole interval is at or on
    the other side of it, cannot tell when the interval holds it. Without an interval the value alone decides.

    Example:
        >>> threshold_verdict(Estimate(0.8, 0.05, "jackknife over 8 minibatches"), 0.5, True, "far-layer CKA")
        ('shows', 'far-layer CKA 0.800 ± 0.050 (jackknife over 8 minibatches) is above 0.5')
        >>> threshold_verdict(Estimate(0.0), 0.0, True, "share of local heads")[0]
        'does not show'
    """
    if not math.isfinite(estimate.value):
        return NOT_MEASURED, f"{what} was not measured"
    half = estimate.half if math.isfinite(estimate.half) else 0.0
    low, high = estimate.value - half, estimate.value + half
    where = "above" if above else "below"
    number = f"{what} {estimate.text(basis=True)}"
    beyond = low > threshold if above else high < threshold
    short = high <= threshold if above else low >= threshold
    if beyond:
        return SHOWS, f"{number} is {where} {threshold:.4g}"
    if short:
        return DOES_NOT, f"{number} is not {where} {threshold:.4g}"
    return CANNOT_TELL, f"{number}: its interval holds {threshold:.4g}"


def combine(verdicts: Sequence[str]) -> str:
    """One verdict for a finding made of several parts: all shown, none shown, or partly (undecided parts win).

    Example:
        >>> combine([SHOWS, SHOWS]), combine([SHOWS, DOES_NOT]), combine([SHOWS, CANNOT_TELL]), combine([DOES_NOT])
        ('shows', 'partly', 'cannot tell', 'does not show')
    """
    measured = [v for v in verdicts if v != NOT_MEASURED]
    if not measured:
        return NOT_MEASURED
    if CANNOT_TELL in measured:
        return CANNOT_TELL
    if all(v == SHOWS for v in measured):
        return SHOWS
    if all(v == DOES_NOT for v in measured):
        return DOES_NOT
    return PARTLY


def transformer(result: CKAResult, role: str = "model") -> bool | None:
    """Whether a probed model is a transformer (has attention the attention analysis measured); ``None``: unknown.

    The attention analysis measures every model of a probe that has attention modules, so when it ran, a model
    without ``attention_layers`` has none. Without it, the probe cannot tell.
    """
    prefix = "" if role == "model" else f"{role}_"
    layers = result.get(f"{prefix}attention_layers")
    if layers is not None and len(layers):
        return True
    if result.analysis("attention") is not None:
        return False
    reason = str((result.settings_dict().get("left_out") or {}).get("attention", ""))
    return False if "attention" in reason and ("no " in reason or "has no" in reason) else None


_FAMILIES = (
    ("efficientnet", "EfficientNet"),
    ("convnext", "ConvNeXt"),
    ("regnet", "RegNet"),
    ("mobilenet", "MobileNet"),
    ("resnet", "ResNet"),
    ("vgg", "VGG"),
    ("deit", "DeiT"),
    ("swin", "Swin"),
    ("vit", "ViT"),
    ("visiontransformer", "ViT"),
)


def architecture(result: CKAResult, role: str = "model") -> str:
    """What a probed model is, in a word a caption can use: ``EfficientNet``, ``ResNet``, ``ViT``...

    From its label (the reference's timm name or module class); else ``the CNN`` or ``the ViT`` by whether it has
    attention, else ``the model`` / ``the reference``.
    """
    prefix = "" if role == "model" else f"{role}_"
    label = str(result.get(f"{prefix}label") or "").lower().replace("_", "").replace("-", "")
    for key, name in _FAMILIES:
        if key in label:
            return name
    kind = transformer(result, role)
    return "the ViT" if kind else "the CNN" if kind is False else ("the model" if role == "model" else "the reference")


def named(kind: str) -> str:
    """``ResNet`` -> ``the ResNet``, ``the CNN`` stays: a name a sentence can start with after "of"."""
    return kind if kind.startswith("the ") else f"the {kind}"


def bare(kind: str) -> str:
    """``the CNN`` -> ``CNN``: the name inside a sentence such as "each ResNet layer"."""
    return kind.removeprefix("the ")


def sentence(text: str) -> str:
    """``text`` with a capital first letter and a full stop."""
    text = text.strip()
    return f"{text[:1].upper()}{text[1:]}{'' if text.endswith('.') else '.'}" if text else ""


def figures_of(analysis: Any, result: CKAResult, tags: Sequence[str], view: Any) -> list[Figure]:
    """The figures ``tags`` of ``analysis`` drawn from one probe (``previous=None``: a probe on its own)."""
    drawn = {f.tag: f for f in analysis.figures(result, None, view)}
    return [drawn[tag] for tag in tags if tag in drawn]


def per_side(evidence: Evidence, make: Callable[[Side], Finding | None]) -> list[Finding]:
    """``make`` applied to every side; a side's findings are labelled with it when a report has two."""
    out = []
    for side in evidence.sides:
        finding = make(side)
        if finding is not None:
            finding.side = side.label if evidence.paired else ""
            out.append(finding)
    return out


def spread_text(values: Sequence[float], digits: int = 2) -> str:
    """``0.91 (seeds: 0.92, 0.90)`` for several runs, the value alone for one."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "-"
    if len(finite) == 1:
        return f"{finite[0]:.{digits}f}"
    return f"{np.mean(finite):.{digits}f} (runs: {', '.join(f'{v:.{digits}f}' for v in finite)})"


@dataclass(frozen=True)
class GroupTest:
    """The difference of two groups of runs (A - B) with its interval, Welch's test and what the seeds can detect.

    Attributes:
        difference: mean of A minus mean of B.
        half: half-width of its interval (Welch-Satterthwaite degrees of freedom).
        p: two-sided p-value of Welch's t (NaN with fewer than 2 runs a side or no spread).
        detectable: the smallest difference these seeds detect at ``alpha`` with 80 % power.
        runs: runs of A and of B.
        alpha: the significance level.
    """

    difference: float
    half: float
    p: float
    detectable: float
    runs: tuple[int, int]
    alpha: float = 0.05

    @property
    def significant(self) -> bool:
        """Welch's p below ``alpha``."""
        return bool(self.p < self.alpha)

    def text(self, digits: int = 3) -> str:
        """``-0.120 ± 0.080, Welch p = 0.031, 3 vs 3 runs``."""
        interval = f" ± {self.half:.{digits}f}" if math.isfinite(self.half) else ""
        p = f", Welch p = {self.p:.2g}" if math.isfinite(self.p) else ""
        return f"{self.difference:+.{digits}f}{interval}{p}, {self.runs[0]} vs {self.runs[1]} runs"

    @property
    def needs(self) -> str:
        """What would decide it: the difference these seeds detect, and more seeds."""
        if not math.isfinite(self.detectable):
            return "2 or more seeds a side (3 for a claim)"
        return (
            f"at this spread, {self.runs[0]} vs {self.runs[1]} seeds detect a difference of about "
            f"{self.detectable:.2g} (80 % power); more seeds a side detect smaller ones"
        )


def group_difference(a: Sequence[float], b: Sequence[float], alpha: float = 0.05, level: float = LEVEL) -> GroupTest:
    """Welch's comparison of per-run values of two groups.

    Example:
        >>> test = group_difference([0.30, 0.32, 0.31], [0.20, 0.22, 0.21])
        >>> round(test.difference, 3), test.significant, round(test.half, 3)
        (0.1, True, 0.023)
    """
    xa = np.asarray([v for v in a if math.isfinite(v)], dtype=np.float64)
    xb = np.asarray([v for v in b if math.isfinite(v)], dtype=np.float64)
    difference = float(xa.mean() - xb.mean()) if xa.size and xb.size else float("nan")
    if xa.size < 2 or xb.size < 2:
        return GroupTest(difference, float("nan"), float("nan"), float("nan"), (xa.size, xb.size), alpha)
    sd_a, sd_b = float(xa.std(ddof=1)), float(xb.std(ddof=1))
    var_a, var_b = sd_a**2 / xa.size, sd_b**2 / xb.size
    p = float(welch_test(xa.mean(), var_a, xa.size - 1, xb.mean(), var_b, xb.size - 1))
    if var_a + var_b == 0:  # no spread at all: equal groups are not different, unequal ones certainly are
        p = 1.0 if difference == 0 else 0.0
        return GroupTest(difference, 0.0, p, 0.0, (xa.size, xb.size), alpha)
    dof = (var_a + var_b) ** 2 / (var_a**2 / (xa.size - 1) + var_b**2 / (xb.size - 1))
    half = float(t_critical(level, dof)) * math.sqrt(var_a + var_b)
    detectable = detectable_difference(sd_a, xa.size, sd_b, xb.size, alpha)
    return GroupTest(difference, half, p, detectable, (xa.size, xb.size), alpha)
