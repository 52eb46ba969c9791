"""canvas_loop (decoupled): runs dgemma.sampler.generate for each request with a backend built once.

Thin glue: the loop, streaming and statistics live in dgemma.serving.canvas_loop.run; this file only moves
tensors and maps errors. Cancellation (client gone / stream cancelled) is polled before every denoising step."""

import traceback

import triton_python_backend_utils as pb_utils

from dgemma.errors import Cancelled, DgemmaError
from dgemma.serving.canvas_loop import Request, build_engine, model_parameters, run

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        self.backend, self.sampler, self.tok = build_engine(model_parameters(args))

    def execute(self, requests):
        for r in requests:
            sender = r.get_response_sender()

            def send(tensors, sender=sender):
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in tensors.items()]))

            try:
                raw = pb_utils.get_input_tensor_by_name(r, "request").as_numpy().reshape(-1)[0]
                run(self.backend, self.sampler, self.tok, Request.from_json(raw), send, sender.is_cancelled)
                sender.send(flags=FINAL)
            except Cancelled:
                sender.send(flags=FINAL)
            except DgemmaError as e:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"{type(e).__name__}: {e}", pb_utils.TritonError.INVALID_ARG)), flags=FINAL)
            except Exception:
                pb_utils.Logger.log_error(f"canvas_loop request {r.request_id()!r}:\n{traceback.format_exc()}")
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"internal error in canvas_loop (request {r.request_id()!r}); see server log")), flags=FINAL)
        return None
