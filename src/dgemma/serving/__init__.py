"""Triton serving: request parsing and response building (canvas_loop), repository rendering (render),
server lifecycle (server). Importable without Triton; the model.py files in triton_repo/ are thin glue."""
