"""`dgemma deploy` (`make deploy`): Kubernetes manifests for one GPU profile -> build/deploy/<gpu>/<precision>/
(kustomize base + overlay, rendered.yaml, image/Dockerfile, monitoring/, kserve/; dgemma.deploy)."""

from __future__ import annotations

from ..deploy import image, manifests
from ..deploy.render import write
from ..deploy.spec import GPU_PRODUCT, make_spec


def cmd_deploy(args) -> int:
    spec = make_spec(args.gpu, args.precision, args.replicas, args.max_replicas, args.gpus, args.image,
                     args.gpu_product, args.expose_triton_http, args.engine_cache, args.prometheus_url)
    root = write(spec, args.out)
    print(f"wrote {root}: base/, overlays/{spec.key}/, rendered.yaml, image/Dockerfile, monitoring/, kserve/")
    print(f"{spec.target.key}: {spec.replicas} replica(s) (HPA {spec.replicas}..{spec.max_replicas} on "
          f"{manifests.QUEUED} > {spec.hpa_targets[0]}/pod), {spec.gpus} GPU(s)/pod on {spec.gpu_product}, "
          f"image {spec.image} ({image.TRITON_IMAGE}, TensorRT {image.TENSORRT_VERSION})")
    print(f"apply: kubectl apply -k {root}/overlays/{spec.key}")
    return 0


def add_parser(sub) -> None:
    d = sub.add_parser("deploy", help="render Kubernetes manifests (kustomize base + overlay, KServe variant) into "
                                      "build/deploy/<gpu>/<precision>/")
    d.add_argument("--gpu", required=True, help="GPU profile: " + ", ".join(GPU_PRODUCT))
    d.add_argument("--precision", default="fp8")
    d.add_argument("--replicas", default="1", help="pods serving at all times (HPA minimum)")
    d.add_argument("--max-replicas", help="HPA maximum (default 2 x --replicas)")
    d.add_argument("--gpus", default="1", help="GPUs per pod, one dgemma model instance each: a count or 0,1,...")
    d.add_argument("--image", help=f"image built from image/Dockerfile (default {image.default_image('<version>')})")
    d.add_argument("--gpu-product", help="nvidia.com/gpu.product node label (default: the profile's GPU Feature "
                                         "Discovery value)")
    d.add_argument("--expose-triton-http", action="store_true",
                   help="also serve Triton's HTTP port 8000 on the pod IP and the Service. RISK: "
                        + manifests.HTTP_RISK)
    d.add_argument("--engine-cache", default="pvc", help="pvc (ReadWriteMany, shared by pods) or emptydir")
    d.add_argument("--prometheus-url", help="Prometheus for the KServe variant's KEDA trigger")
    d.add_argument("--out", help="output directory (default build/deploy/<gpu>/<precision> in the work directory)")
    d.set_defaults(func=cmd_deploy)
