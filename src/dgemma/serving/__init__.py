"""Triton serving: requests, the per-request loop, slots and metrics (canvas_loop), the encoder/denoiser models'
IO and batch runner (graph_models), repository rendering (render), server lifecycle (server), measurements
(loadtest). Importable without Triton; the model.py files in triton_repo/ are thin glue."""
