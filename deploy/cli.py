"""`embps deploy render job.toml --out DIR`: Kubernetes manifests from the job's TOML (deploy/render.py)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="deploy", required=True)
    render = actions.add_parser("render", help="write Kubernetes manifests ([deploy] section) into --out")
    render.add_argument("config", help="job TOML with a [deploy] section")
    render.add_argument("--out", required=True, help="folder for the manifests (`kubectl apply -f DIR`)")


def run(args: argparse.Namespace) -> int:
    from deploy.render import render_cli

    return render_cli(args.config, args.out)
