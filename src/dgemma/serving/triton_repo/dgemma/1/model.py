"""dgemma (decoupled): LLM-shaped request -> a row of the in-flight batch -> text, with a backend built once.

Thin glue: validation (dgemma.serving.request), the request's generation and responses (.loop.Job), the step-level
scheduler (.scheduler) and the metrics (.metrics) live in the package; this file only moves tensors, starts one
thread per request (execute() returns at once; that thread waits for its row, the scheduler thread sends the
responses), creates the custom metrics and maps errors: a bad request is INVALID_ARG with its message, a full
queue UNAVAILABLE, anything else (a backend or graph-model fault) INTERNAL with one line; the traceback goes to the
server log only. Cancellation (client gone / stream cancelled) is checked at every step and while queued.

The same file is the `ensemble` rendering's canvas_loop step (parameter step = canvas_loop): it takes the request
that `preprocess` validated (input `request`, JSON) and answers token ids (`output_ids`) for `postprocess`."""

import threading
import time
import traceback

import triton_python_backend_utils as pb_utils

from dgemma.core.contract import MODEL_INPUTS, REQUEST
from dgemma.core.errors import Busy, RequestError
from dgemma.runtime.bls_backend import BlsError
from dgemma.serving.loop import Job, load_engine, model_parameters
from dgemma.serving.metrics import METRICS, Recorder
from dgemma.serving.request import Limits, Request, parse_request
from dgemma.serving.scheduler import Scheduler

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.limits = Limits.from_parameters(params)
        self.step = params.get("step") == "canvas_loop"  # the ensemble's canvas_loop step
        device_id = args.get("model_instance_device_id") if args.get("model_instance_kind") == "GPU" else None
        self.engine = load_engine(params, device_id=int(device_id) if device_id is not None else None)
        self.instance = args.get("model_instance_name", "dgemma")  # one per GPU with `dgemma repo --gpus`
        self.tok = self.engine.tokenizer
        kinds = {"histogram": pb_utils.MetricFamily.HISTOGRAM, "counter": pb_utils.MetricFamily.COUNTER,
                 "gauge": pb_utils.MetricFamily.GAUGE}  # not defined while Triton auto-completes the config
        self.families = {name: pb_utils.MetricFamily(name=name, description=desc, kind=kinds[kind])
                         for name, (kind, desc, _b) in METRICS.items()}
        self.recorder = Recorder(self._metric)
        self.scheduler = Scheduler(self.engine.backend, int(params["max_batch"]), int(params["max_queued"]),
                                   self.recorder, int(params["prefill_chunk"]), pb_utils.Logger.log_info)
        self.threads = set()

    def _metric(self, name, labels):
        buckets = METRICS[name][2]
        labels = {"model": "dgemma", "instance": self.instance, **labels}  # instances' series must not collide
        fam = self.families[name]
        return fam.Metric(labels=labels, buckets=list(buckets)) if buckets else fam.Metric(labels=labels)

    def execute(self, requests):
        for r in requests:
            t = threading.Thread(target=self._run, args=(r, time.perf_counter()), daemon=True)
            self.threads.add(t)
            t.start()
        return None

    def _run(self, r, arrived):
        sender = r.get_response_sender()

        def send(tensors):
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in tensors.items()]))

        def fail(message, code):
            try:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)), flags=FINAL)
            except Exception as e:  # the client is gone (cancelled stream, closed connection): nothing to tell
                pb_utils.Logger.log_info(f"dgemma request {r.request_id()!r}: could not send the error: {e}")

        try:
            if self.step:
                req = Request.from_json(pb_utils.get_input_tensor_by_name(r, REQUEST).as_numpy().reshape(-1)[0])
            else:
                inputs = {}
                for name in MODEL_INPUTS:
                    t = pb_utils.get_input_tensor_by_name(r, name)
                    if t is not None:
                        inputs[name] = t.as_numpy()
                req = parse_request(inputs, self.limits, self.tok)
            self.scheduler.submit(Job(req, self.engine, send, arrived, ids=self.step), sender.is_cancelled)
            sender.send(flags=FINAL)  # also after a cancellation: the final flag releases the request
        except Busy as e:
            fail(f"Busy: {e}", pb_utils.TritonError.UNAVAILABLE)
        except RequestError as e:
            fail(f"{type(e).__name__}: {e}", pb_utils.TritonError.INVALID_ARG)
        except BlsError as e:
            pb_utils.Logger.log_error(f"dgemma request {r.request_id()!r}: {e!r}")
            fail(f"graph model unavailable (request {r.request_id()!r}): {str(e).splitlines()[0][:200]}",
                 pb_utils.TritonError.UNAVAILABLE)
        except Exception as e:
            tb = "".join(traceback.format_exception(e))
            pb_utils.Logger.log_error(f"dgemma request {r.request_id()!r}:\n{tb}")
            fail(f"internal error in dgemma (request {r.request_id()!r}); see server log",
                 pb_utils.TritonError.INTERNAL)
        finally:
            self.threads.discard(threading.current_thread())

    def finalize(self):
        self.scheduler.close()
        for t in list(self.threads):
            t.join(timeout=5)
