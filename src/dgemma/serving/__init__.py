"""Stage `make repo` / `make serve`: the Triton service. Request parsing and validation (request), the in-flight
scheduler that batches every request's row (scheduler), custom metrics (metrics), one request's generation and
responses (loop), the encoder/denoiser models' batch
runner (graph_models), repository rendering (render: templates in triton_repo/), the tritonserver process (server)
and the gRPC client (client). Importable without Triton; the model.py files in triton_repo/ are thin glue."""
