"""Kubernetes manifests for a job: `embps deploy render job.toml --out DIR` (see deploy/render.py)."""
