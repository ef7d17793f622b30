"""The built-in analyses, each a unit (see :class:`lightning_cka.engine.analysis.Analysis`), and how names resolve.

Every module of this package is imported here, so each built-in analysis is known by its name as soon as the package
is: adding one is writing one module. Nothing here imports torch.
"""

import importlib
import pkgutil
from collections.abc import Sequence

from lightning_cka.engine.analysis import Analysis, registered

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

AnalysisSpec = Analysis | str
DEFAULT = "default"


def builtin_analyses() -> list[type[Analysis]]:
    """The analysis classes of this package, in the order of their figures."""
    classes = {
        cls for cls in _subclasses(Analysis) if cls.__module__.startswith(f"{__name__}.") and "name" in vars(cls)
    }
    return sorted(classes, key=lambda cls: (cls.position, cls.name))


def default_analyses() -> list[Analysis]:
    """A fresh instance of every analysis that runs when none are given, with its default options."""
    return [cls() for cls in builtin_analyses() if cls.default]


def resolve_analyses(spec: Sequence[AnalysisSpec] | None) -> list[tuple[Analysis, bool]]:
    """The analyses ``spec`` asks for, each with whether it was named explicitly.

    Args:
        spec: ``None`` (the defaults), or analyses and names: an :class:`Analysis` object as it is, a name for that
            analysis with its default options, and ``"default"`` for every default analysis not otherwise given.

    Returns:
        ``(analysis, explicit)`` pairs in the order given (``"default"`` expanded where it stands, by position).
        Defaults are not explicit: where one does not apply to a model it is left out quietly.

    Raises:
        ValueError: an unknown name, something that is neither a name nor an analysis, or one analysis given twice.
    """
    if spec is None:
        return [(analysis, False) for analysis in default_analyses()]
    if isinstance(spec, str | Analysis):
        spec = [spec]
    named: list[tuple[Analysis, bool] | None] = []
    for item in spec:
        if isinstance(item, Analysis):
            named.append((item, True))
        elif item == DEFAULT:
            named.append(None)
        elif isinstance(item, str):
            cls = registered(item)
            if cls is None:
                known = ", ".join(sorted(c.name for c in builtin_analyses()))
                raise ValueError(
                    f"analyses: no analysis is called {item!r}; the built-in ones are {known} (and 'default'), or "
                    "pass an Analysis object."
                )
            named.append((cls(), True))
        else:
            raise ValueError(f"analyses takes Analysis objects and names, got {type(item).__name__} {item!r}.")
    given = [pair[0].name for pair in named if pair is not None]
    twice = sorted({name for name in given if given.count(name) > 1})
    if twice:
        raise ValueError(f"analyses: {', '.join(twice)} given more than once; give each analysis once.")
    out: list[tuple[Analysis, bool]] = []
    for pair in named:
        if pair is None:
            out += [
                (a, False) for a in default_analyses() if a.name not in given and a.name not in {x.name for x, _ in out}
            ]
        else:
            out.append(pair)
    return out


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


# Each built-in analysis class is importable from here by its class name (``from lightning_cka.analyses import
# Localization``), whichever module defines it.
globals().update({cls.__name__: cls for cls in builtin_analyses()})
__all__ = sorted(
    [cls.__name__ for cls in builtin_analyses()]
    + ["builtin_analyses", "default_analyses", "resolve_analyses", "AnalysisSpec", "DEFAULT"]
)
