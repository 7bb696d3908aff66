"""What the Prometheus metrics of every embps server share, so that a shard's and a replica's
latency histograms can be compared bucket by bucket."""

from __future__ import annotations

# 50 us .. 10 s: a small lookup takes ~100 us of server time, a 64 MiB push a few seconds.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)
