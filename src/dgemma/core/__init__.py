"""Layer 0 of dgemma: what every stage shares and nothing that computes. Errors, model and sampler configs, GPU
profiles and the precision policy, the artifact layout (every path from a work directory), the IO contract of the
graphs and of the served model, and stage manifests (atomic publication, fingerprints, staleness checks).
Imports no torch and no other dgemma package."""
