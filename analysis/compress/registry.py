"""The named methods, in the order every table and legend lists them, the presets, and the lists drawn from them.

``METHODS`` are the methods of the paper's tables (plus the random floor). ``PRESETS`` are further
method names: points of the merge space named after the rule they imitate, and the baselines' original
sinks/recent splits (``…_orig``). A custom point of the merge space, ``merge:target=similar,cap=2``, is a
method name too. ``policy_class`` accepts all three, everywhere a method name is taken.
"""

from __future__ import annotations

from dataclasses import dataclass

from analysis.compress.base import Policy
from analysis.compress.cam import CaM
from analysis.compress.full import Full
from analysis.compress.h2o import H2O
from analysis.compress.merging import PREFIX, MergeSpec, point, spec_class
from analysis.compress.random_policy import RandomPolicy
from analysis.compress.streaming_llm import StreamingLLM
from analysis.compress.tova import TOVA
from analysis.compress.weightedkv import WeightedKV
from analysis.compress.weightedkv_evict import WeightedKVEvict
from analysis.errors import UserError

METHODS: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (Full, StreamingLLM, H2O, TOVA, CaM, WeightedKV, WeightedKVEvict, RandomPolicy)
}
# The comparison at the centre of the toolkit: the same victim, its value merged or dropped.
MERGE_VS_EVICT: tuple[str, str] = (WeightedKV.name, WeightedKVEvict.name)


@dataclass(frozen=True)
class Preset:
    """A named configuration: a merge ``spec`` or a registered ``base`` method, optionally with its own split.

    ``sinks``/``recent`` (when not None) replace the sweep's split for this method only, so one sweep runs a
    baseline's original form beside the shared one. ``recent=None`` with ``sinks`` set keeps the default rule
    ``budget // 2 - sinks``.
    """

    name: str
    reference: str
    simplified: str
    spec: MergeSpec | None = None
    base: str | None = None
    sinks: int | None = None
    recent: int | None = None
    own_recent: bool = False  # ``recent`` (even None: the default rule) replaces the sweep's

    def cls(self) -> type[Policy]:
        if self.spec is not None:
            return spec_class(self.name, self.spec, preset=self)
        base = METHODS[self.base]
        return type(f"{base.__name__}[{self.name}]", (base,), {"name": self.name, "in_paper": False, "preset": self})


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("weightedkv_similar", "WeightedKV's weights with KeepKV/D2O's target (issue 17's probe)",
           "none: WeightedKV with target=similar", MergeSpec(target="similar")),
    Preset("keepkv_like", "KeepKV, arXiv 2504.09936: most similar key, K and V weighted by votes x attention",
           "no log(votes) logit bonus (the kernel adds no per-slot bias) and no similarity threshold; "
           "selection by average attention", MergeSpec(target="similar", weights="votes", what="key_value")),
    Preset("d2o_like", "D2O, ICLR 2025 (arXiv 2406.13035): most similar retained key above a threshold, "
           "similarity weights", "a fixed threshold 0.5 instead of the EMA one, one victim per step, selection "
           "by average attention (no layer-wise budgets)",
           MergeSpec(target="similar", weights="similarity", what="key_value", threshold=0.5)),
    Preset("mergingpress_like", "kvpress MergingPress (PR #219): most cosine-similar survivor, weight "
           "sim x |v_e| / (|v_e| + |v_t|), keys unchanged", "read as a convex pair (w, 1 - w); selection by "
           "average attention instead of the press's scorer", MergeSpec(target="similar", weights="norm_ratio")),
    Preset("asymkv_like", "AsymKV, arXiv 2506.05410: adjacent keys merged, values kept",
           "a one-slot-per-token cache cannot keep a value without its key: the victim's key is merged into its "
           "right neighbour's (average-attention weights) and its value is dropped", MergeSpec(what="key")),
    Preset("tova_orig", "TOVA, Oren et al. 2024, as published: no sinks, no protected window",
           "the newest token is still never a victim", base="tova", sinks=0, recent=0, own_recent=True),
    Preset("h2o_orig", "H2O, Zhang et al. 2023, as published: m/2 recent tokens, no sinks",
           "decisions per KV head on the GQA group mean", base="h2o", sinks=0, recent=None, own_recent=True),
)}


def policy_class(method: str) -> type[Policy]:
    """The class of a registered method, a preset, or a ``merge:`` point."""
    if method in METHODS:
        return METHODS[method]
    if method in PRESETS:
        return PRESETS[method].cls()
    if method.startswith(PREFIX):
        return point(method)
    raise UserError(f"unknown compression method {method!r}; valid: {', '.join([*METHODS, *PRESETS])}, "
                    f"or {PREFIX}key=value,... (see analysis.compress.merging)")


def eviction_ablation(method: str) -> str | None:
    """A merging method's own eviction ablation (its selection, nothing merged): ``weightedkv_evict`` for
    average-attention selection, ``streaming_llm`` for CaM's selection by position; None if it does not merge."""
    cls = policy_class(method)
    spec = getattr(cls, "spec", None)
    if spec is None or not cls.merges:
        return None
    return "streaming_llm" if spec.select == "position" else "weightedkv_evict"


def in_registry_order(names) -> list[str]:
    """``names`` once each: registered methods in registry order, then presets and points in the order given."""
    names = list(dict.fromkeys(names))
    return [m for m in METHODS if m in names] + [m for m in names if m not in METHODS]


def compresses(method: str) -> bool:
    """Whether ``method`` ever shrinks the cache (every method but the ``full`` reference)."""
    return policy_class(method).compresses


def method_names(*, compressing: bool | None = None, in_paper: bool | None = None,
                 merging: bool | None = None, presets: bool = False) -> list[str]:
    """Registered names in registry order, filtered by capability (None: either); ``presets`` adds the presets."""
    def keep(cls: type[Policy]) -> bool:
        return all(want is None or got == want for want, got in
                   ((compressing, cls.compresses), (in_paper, cls.in_paper), (merging, cls.merges)))
    names = [*METHODS, *PRESETS] if presets else list(METHODS)
    return [name for name in names if keep(policy_class(name))]


@dataclass(frozen=True)
class PolicyOptions:
    """What every scored method shares: ``sinks`` protected first positions, ``recent`` protected newest
    ones (None: each budget's ``budget // 2 - sinks``) and the ``seed`` of the randomised methods."""

    sinks: int = 4
    recent: int | None = None
    seed: int = 0


def make_policy(method: str, budget: int | None, sinks: int = 4, recent: int | None = None, seed: int = 0) -> Policy:
    """Build the policy registered as ``method`` (a name, a preset or a ``merge:`` point); ``seed`` goes to the
    randomised ones only. A preset that carries its own sinks/recent split uses it instead of these."""
    cls = policy_class(method)
    preset = getattr(cls, "preset", None)
    if preset is not None and preset.sinks is not None:
        sinks = preset.sinks
    if preset is not None and preset.own_recent:
        recent = preset.recent
    kwargs = {"budget": budget, "sinks": sinks, "recent": recent} | ({"seed": seed} if cls.seeded else {})
    return cls(**kwargs)
