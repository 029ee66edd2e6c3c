"""Routing-collapse detector: an expert below ``threshold`` x its fair share for ``window`` logs in a row."""

from __future__ import annotations


class CollapseDetector:
    def __init__(self, threshold: float, window: int) -> None:
        self.threshold, self.window = threshold, window
        self._streak: dict[tuple[int, int], int] = {}
        self._reported: set[tuple[int, int]] = set()

    def update(self, fractions_by_layer: dict[int, list[float]]) -> list[str]:
        """Feed per-layer expert fractions; return one message per newly collapsed (layer, expert)."""
        messages = []
        for layer, fractions in fractions_by_layer.items():
            fair = 1.0 / len(fractions)
            for expert, frac in enumerate(fractions):
                key = (layer, expert)
                starved = frac < self.threshold * fair
                self._streak[key] = self._streak.get(key, 0) + 1 if starved else 0
                if starved and self._streak[key] >= self.window and key not in self._reported:
                    self._reported.add(key)
                    messages.append(
                        f"routing collapse: layer {layer} expert {expert} has received {frac:.2%} of tokens "
                        f"(fair share {fair:.2%}) for {self._streak[key]} consecutive logged steps"
                    )
                elif not starved:
                    self._reported.discard(key)
        return messages
