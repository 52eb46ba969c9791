"""Stage `make bench` / `make report`: scenarios (scenario: bench/scenarios/*.toml package data), the benchmark
arithmetic (metrics), in-process runs over any backend (inprocess), runs through the Triton model over gRPC
(served), GPU telemetry (telemetry), hardware reports and plots (report) and the GPU probe (probe). Writes
bench/results/<gpu>/<precision>/ and bench/reports/ in the work directory. Uses serving's public client, render
and server; no other stage."""
