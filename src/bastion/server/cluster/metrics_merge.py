"""The front's /metrics: every replica's Prometheus text as one exposition, each sample
labelled `replica="<id>"` (sum by that label away for cluster totals), plus the front's
own series (retries, cut streams, live replicas).

The text format wants all samples of a family together under one `# HELP`/`# TYPE`; the
replicas' registries are alike, so their families are merged in first-seen order.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class FrontMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.retries = Counter("bastion_cluster_retries", "requests retried on another replica before their "
                               "first byte", registry=self.registry)
        self.cut_streams = Counter("bastion_cluster_streams_cut", "responses whose replica failed mid-way "
                                   "(streams end with an error event)", registry=self.registry)
        self.unrouted = Counter("bastion_cluster_unrouted", "requests no replica could take (503)",
                                registry=self.registry)
        self.replicas = Gauge("bastion_cluster_replicas", "replicas the front routes to", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def merge(expositions: list[tuple[str, str]]) -> str:
    """One exposition from (replica id, Prometheus text) pairs."""
    families: dict[str, tuple[list[str], list[str]]] = {}  # name -> (# lines, samples)
    for replica, text in expositions:
        label = f'replica="{_escape(replica)}"'
        current = None
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    current = parts[2]
                    meta, _ = families.setdefault(current, ([], []))
                    if not any(m.split(None, 2)[1] == parts[1] for m in meta):
                        meta.append(line)
                continue
            name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
            if name_end < 0:
                continue
            name = line[:name_end]
            if line[name_end] == "{":
                rest = line[name_end + 1:]
                sample = f"{name}{{{label}{'' if rest.startswith('}') else ','}{rest}"
            else:
                sample = f"{name}{{{label}}}{line[name_end:]}"
            family = current if current is not None and name.startswith(current) else name
            families.setdefault(family, ([], []))[1].append(sample)
    lines: list[str] = []
    for meta, samples in families.values():
        lines += meta + samples
    return "\n".join(lines) + ("\n" if lines else "")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
