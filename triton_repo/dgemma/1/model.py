"""dgemma (decoupled): LLM-shaped request -> dgemma.sampler.generate -> text, with a backend built once.

Thin glue: validation, the loop, streaming, slots and statistics live in dgemma.serving.canvas_loop; this file
only moves tensors, starts one thread per request (execute() returns at once; the thread sends the responses),
creates the custom metrics and maps errors. Cancellation (client gone / stream cancelled) is polled before
every denoising step and while a request waits for a slot."""

import threading
import traceback

import triton_python_backend_utils as pb_utils

from dgemma.errors import DgemmaError
from dgemma.serving.canvas_loop import (INPUTS, METRICS, Busy, Limits, Recorder, Slots, build_engine,
                                        model_parameters, parse_request, serve, text_response)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.limits = Limits.from_parameters(params)
        self.engine = build_engine(params)
        self.tok = self.engine[2]
        self.slots = Slots(int(params["max_batch"]), int(params["max_queued"]))
        kinds = {"histogram": pb_utils.MetricFamily.HISTOGRAM, "counter": pb_utils.MetricFamily.COUNTER,
                 "gauge": pb_utils.MetricFamily.GAUGE}  # not defined while Triton auto-completes the config
        self.families = {name: pb_utils.MetricFamily(name=name, description=desc, kind=kinds[kind])
                         for name, (kind, desc, _b) in METRICS.items()}
        self.recorder = Recorder(self._metric)
        self.threads = set()

    def _metric(self, name, labels):
        buckets = METRICS[name][2]
        labels = {"model": "dgemma", **labels}
        fam = self.families[name]
        return fam.Metric(labels=labels, buckets=list(buckets)) if buckets else fam.Metric(labels=labels)

    def execute(self, requests):
        for r in requests:
            t = threading.Thread(target=self._run, args=(r,), daemon=True)
            self.threads.add(t)
            t.start()
        return None

    def _run(self, r):
        sender = r.get_response_sender()

        def send(tensors):
            out = text_response(tensors, self.tok)
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in out.items()]))

        try:
            inputs = {}
            for name in INPUTS:
                t = pb_utils.get_input_tensor_by_name(r, name)
                if t is not None:
                    inputs[name] = t.as_numpy()
            req = parse_request(inputs, self.limits, self.tok.encode_chat)
            serve(self.engine, req, send, sender.is_cancelled, self.slots, self.recorder, pb_utils.Logger.log_info)
            sender.send(flags=FINAL)
        except DgemmaError as e:
            code = pb_utils.TritonError.UNAVAILABLE if isinstance(e, Busy) else pb_utils.TritonError.INVALID_ARG
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(e).__name__}: {e}", code)),
                        flags=FINAL)
        except Exception:
            pb_utils.Logger.log_error(f"dgemma request {r.request_id()!r}:\n{traceback.format_exc()}")
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"internal error in dgemma (request {r.request_id()!r}); see server log")), flags=FINAL)
        finally:
            self.threads.discard(threading.current_thread())

    def finalize(self):
        for t in list(self.threads):
            t.join(timeout=5)
