"""CaM: StreamingLLM eviction whose victim's value is merged, at random, into its successors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from analysis.compress.merging import MergePolicy, MergeSpec


@dataclass
class CaM(MergePolicy):
    """Evict as StreamingLLM; before removal, maybe add the victim's value to the next values.

    Victim j is the oldest non-sink token (the one leaving the window); its targets are the next
    ``merge_num`` valid slots by position. Per (batch row, KV head), with ``acc`` the summed attention,

        p = acc[j] / mean(acc[targets])   (NaN -> 0),  gate ~ Bernoulli(clamp(p, 0, 1))
        v[targets] += gate * v[j] / merge_num

    The target range is clipped to the cache end but the divisor stays ``merge_num``; targets are
    not renormalised; the key and the victim's statistics are dropped. Interpretations:
    ``merge_num=16`` and the sink + window cache come from the official streaming code
    (``StartRecentKVCache_cam``); the gate is drawn as ``u < p`` with
    ``u = uniform(seed, window, layer, head, victim position)``, so runs are reproducible and each window's
    draws do not depend on the batch it runs in. The point ``select=position, target=next, weights=gate``
    of the merge space (``analysis.compress.merging``); a plan's per-head merge choice applies to it too.

    Reference: Zhang et al., ICML 2024; WeightedKV (arXiv:2503.01330) §II, §V-A.
    """

    merge_num: int = 16
    seed: int = 0

    name: ClassVar[str] = "cam"
    spec: ClassVar[MergeSpec] = MergeSpec(target="next", weights="gate", select="position")
    seeded: ClassVar[bool] = True
    needs_attention: ClassVar[bool] = True
    stats: ClassVar[tuple[str, ...]] = ("acc",)
    merges: ClassVar[bool] = True
