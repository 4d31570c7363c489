"""Mode ``auto``'s choice: a site's cached weights as they are, or a refinement on the scan.

The choice is made from one label-free figure, the cached weights' self-consistency
Dice(early, final) on this scan (docs/method.md, "Site policy").
"""

from __future__ import annotations

from model_store.sites import SiteVersion


def auto_fast_path(
    consistency: float,
    version: SiteVersion,
    threshold: float,
    margin: float | None,
    finds_something: bool = True,
) -> tuple[bool, str]:
    """Whether ``auto`` uses ``version`` as it is, and why (for ``Report.mode_reason``).

    Yes when its self-consistency on this scan reaches ``threshold``, or comes within
    ``margin`` (None: never) of the self-consistency it reached on the scan it was refined
    on: a refinement from it would start where the last one converged. Never when its final
    mask is empty on this scan (``finds_something`` false): two empty masks agree
    perfectly, which says nothing.
    """
    if not finds_something:
        return False, "their final mask is empty on this scan"
    reached = version.self_consistency_after
    if consistency >= threshold:
        return True, f"self-consistency {consistency:.3f} on this scan >= {threshold}"
    if margin is not None and reached is not None and consistency >= reached - margin:
        return True, (
            f"self-consistency {consistency:.3f} on this scan is within {margin} of the "
            f"{reached:.3f} they reached when refined"
        )
    within = (
        f" and below {reached:.3f} - {margin}" if margin is not None and reached is not None else ""
    )
    return False, f"their self-consistency {consistency:.3f} < {threshold}{within}"
