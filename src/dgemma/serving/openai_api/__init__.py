"""OpenAI-compatible HTTP door in front of Triton's `dgemma` model (`dgemma openai`).

Modules: body (hostile input before parsing), params (request validation -> Generation), triton (gRPC
streaming bridge), responses (OpenAI objects and SSE chunks), metrics, app (Starlette routes, auth, SSE,
disconnects), service (uvicorn: `serve`, `start_in_thread`; the CLI is dgemma.cli.openai). The public HTTP door of a deployment: Triton's own HTTP
endpoint stays on loopback (README, Security)."""

from .service import serve, start_in_thread

__all__ = ["serve", "start_in_thread"]
