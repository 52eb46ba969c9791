"""Kubernetes deployment stage (`dgemma deploy`, `make deploy`): manifests for one GPU profile and precision.

spec (what may be deployed, validated), image (the NGC Triton tag and its TensorRT, paired once), manifests (the
objects), overlay (per-profile kustomize patches), render (files, atomically), scaling (capacity planning behind
docs/scaling.md); the command itself is dgemma.cli.deploy. Imports only dgemma.core (profiles, errors, layout): a
stage does not import another, so the serving model's metric names are repeated here and checked against
serving.metrics.METRICS by the tests. It runs nothing on a cluster and needs none to render or to check what it
renders.
"""
