"""Deploy a fine-tuned Mask2Former: merge what folds into the base and export the inference graph.

    model = build_model(cfg); ...load weights and the adapter...
    module = export.prepare(model)                       # merges LoRA / DoRA / conv LoRA / COBOT / SFA in place
    export.export(module, images, "onnx", "out/")        # or "torch_export", "torchscript"

The exported graph (`InstanceSegmentationExport`) takes one input and gives five outputs:

    images          (N, 3, H, W) float32: (pixel - MODEL.PIXEL_MEAN) / MODEL.PIXEL_STD in INPUT.FORMAT channel order,
                    H and W fixed at export (multiples of the backbone's size divisibility), N dynamic
    pred_logits     (N, Q, K + 1) class logits of the Q queries (the last class: no object)
    pred_masks      (N, Q, H / 4, W / 4) mask logits
    scores          (N, T) instance scores, best first: p(class) x the mean mask probability inside the mask,
                    T = min(TEST.DETECTIONS_PER_IMAGE, Q x K) (query, class) pairs, as MaskFormer's instance inference
    pred_classes    (N, T) int64 class of each instance
    instance_masks  (N, T, H, W) bool, the instance masks at the input resolution

Methods whose update folds into the base weights are merged first (the graph is then the base's); the others
(adapters, prefixes, Mona, MoPEFT's gated modules) are exported as the plain modules they are. Deformable
attention exports as the compiled custom op (torch.export, TorchScript: loading the program needs peft_d2's
extension) or decomposed into grid_sample (`msda="reference"`; ONNX always, opset >= 16).
"""

import contextlib
import json
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .checkpoint import atomic_write
from .errors import PeftConfigError
from .inject import peft_parameter_names
from .tuners.base import METHODS

FORMATS = {"onnx": "model.onnx", "torch_export": "model.pt2", "torchscript": "model.ts"}
OUTPUT_NAMES = ("pred_logits", "pred_masks", "scores", "pred_classes", "instance_masks")
ONNX_OPSET = 17  # GridSample (the decomposed deformable attention) needs >= 16


class InstanceSegmentationExport(nn.Module):
    """A MaskFormer's inference from a normalised fixed-size batch to raw and post-processed outputs (the module
    docstring lists them). The post-processing equals MaskFormer.instance_inference on an unpadded image, with
    the instances sorted by their score."""

    def __init__(self, model: nn.Module, detections: int):
        super().__init__()
        self.backbone = model.backbone
        self.sem_seg_head = model.sem_seg_head
        # PEFT modules held at the model's root (COBOT's orchestrator), which the layers above refer to
        self.peft_root = nn.ModuleDict(
            {n: c for n, c in model.named_children() if n not in ("backbone", "sem_seg_head", "criterion")}
        )
        self.num_classes = model.sem_seg_head.num_classes
        self.num_queries = model.num_queries
        self.detections = min(detections, model.num_queries * self.num_classes)

    def forward(self, images):
        outputs = self.sem_seg_head(self.backbone(images))
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        scores, classes, mask_logits = self.instances(logits, masks, images.shape[-2:])
        return logits, masks, scores, classes, mask_logits > 0

    def instances(self, logits, masks, size):
        """(scores, classes, mask logits at `size`) of the top instances, best first: MaskFormer's instance
        inference from the class logits (N, Q, K + 1) and mask logits (N, Q, h, w); a mask is its logits > 0."""
        H, W = size
        probs = F.softmax(logits, dim=-1)[..., :-1].flatten(1)  # (N, Q * K)
        class_scores, pairs = probs.topk(self.detections, dim=1)
        classes = pairs % self.num_classes
        queries = pairs // self.num_classes
        mask_logits = F.interpolate(masks, size=(H, W), mode="bilinear", align_corners=False)
        mask_logits = torch.gather(mask_logits, 1, queries[:, :, None, None].expand(-1, -1, H, W))
        inside = (mask_logits > 0).flatten(2).to(mask_logits.dtype)
        mask_scores = (mask_logits.sigmoid().flatten(2) * inside).sum(2) / (inside.sum(2) + 1e-6)
        scores = class_scores * mask_scores
        order = stable_descending_order(scores)
        mask_logits = torch.gather(mask_logits, 1, order[:, :, None, None].expand(-1, -1, H, W))
        return scores.gather(1, order), classes.gather(1, order), mask_logits


def stable_descending_order(scores: torch.Tensor) -> torch.Tensor:
    """(N, T) -> the (N, T) permutation sorting each row in descending order, equal values (empty masks all score
    0) in their original order: the same in every format, where sort(stable=True) does not export to ONNX and
    TopK's and sort's tie orders differ between runtimes. Formed by counting (T x T comparisons)."""
    t = scores.shape[1]
    idx = torch.arange(t, device=scores.device)
    a, b = scores[:, :, None], scores[:, None, :]  # [n, i, j]: does j come before i?
    rank = ((b > a) | ((b == a) & (idx[None, :] < idx[:, None]))).sum(2)
    return torch.zeros_like(rank).scatter(1, rank, idx.expand_as(rank).contiguous())


def _refuse(model: nn.Module) -> None:
    name = type(model).__name__
    if not all(hasattr(model, k) for k in ("backbone", "sem_seg_head", "num_queries")):
        raise PeftConfigError(
            f"export: the model is a {name}; tools/export_model.py exports Mask2Former (MODEL.META_ARCHITECTURE "
            "'MaskFormer', or 'PEFT' over it). For detectron2's R-CNN models, fold the adapter with "
            "tools/merge_adapter.py and export the plain checkpoint with detectron2's tools/deploy/export_model.py"
        )
    if getattr(model, "peft_adapters", None):
        raise PeftConfigError(
            f"export: the model serves several adapters ({sorted(model.peft_adapters)}) routed per image by "
            "peft_d2.multi, a choice made from each batch's inputs that a fixed graph cannot hold: export one "
            "adapter file at a time (--adapter)"
        )


def _can_merge(layer: nn.Module) -> bool:
    return hasattr(layer, "merge") and layer.__dict__.get("lora_gate") is None  # a MoPEFT gate depends on the input


def prepare(model: nn.Module) -> dict:
    """Puts `model` (a MaskFormer, PEFT or not) in eval mode and folds, in place, every layer whose update merges
    into its base weight. Returns {"merged": [methods], "kept": [methods]}: the methods folded into the base, and
    those that stay in the graph as modules. Refuses (PeftConfigError, the model unchanged) what cannot export."""
    _refuse(model)
    model.eval().requires_grad_(False)
    layers = {name: method.layers(model) for name, method in METHODS.items()}

    def folds(name, layer):
        return METHODS[name].mergeable and _can_merge(layer)

    for name, found in layers.items():
        for _, layer in found:
            if folds(name, layer):
                layer.merge()
    # what still computes: unmerged layers inside the model, and modules at its root (COBOT's orchestrator) that
    # an unmerged module still refers to
    referred = {id(v) for m in model.modules() if not getattr(m, "lora_merged", False)
                for v in vars(m).values() if isinstance(v, nn.Module)}
    kept = {name for name, found in layers.items() for path, layer in found
            if not folds(name, layer) and ("." in path or id(layer) in referred)}
    owners = set(peft_parameter_names(model).values()) | {name for name, found in layers.items() if found}
    kept |= {name for name in owners if not METHODS[name].mergeable}
    merged = {name for name in owners if METHODS[name].mergeable and (name not in kept or any(
        folds(name, layer) for _, layer in layers[name]))}
    return {"merged": sorted(merged), "kept": sorted(kept)}


@contextlib.contextmanager
def _msda_backend(backend: str):
    """Deformable attention through `backend` ("cpu" / "cuda" kernels or "reference") while tracing."""
    saved = os.environ.get(ops.ENV_VAR)
    os.environ[ops.ENV_VAR] = backend
    try:
        yield
    finally:
        if saved is None:
            del os.environ[ops.ENV_VAR]
        else:
            os.environ[ops.ENV_VAR] = saved


def msda_backend_for(fmt: str, msda: str, device_type: str) -> str:
    """The operator backend an export traces: ONNX always the grid_sample decomposition ("reference"); the
    others the compiled kernel when `msda` is "kernel" and it is built (else the decomposition), or as asked."""
    if msda not in ("kernel", "reference"):
        raise PeftConfigError(f"export: msda must be 'kernel' or 'reference', got {msda!r}")
    if fmt == "onnx" or msda == "reference":
        return "reference"
    ok, _ = ops._extension.kernel_status(device_type)
    return device_type if ok else "reference"


def export(module: nn.Module, images: torch.Tensor, fmt: str, output_dir: str, msda: str = "kernel") -> str:
    """Exports `module` (an InstanceSegmentationExport in eval mode) traced on `images` (N >= 2, so that the
    batch stays dynamic) to OUTPUT_DIR/FORMATS[fmt]; returns the path. The batch dimension is dynamic in every
    format; the image size is the sample's.

    ONNX goes through torch.onnx's TorchScript-based exporter (opset ONNX_OPSET): PyTorch deprecates it for its
    torch.export-based one, which took minutes where this takes seconds on the micro Mask2Former (README, "Export")."""
    if fmt not in FORMATS:
        raise PeftConfigError(f"export: --format must be one of {sorted(FORMATS)}, got {fmt!r}")
    if images.dim() != 4 or images.shape[0] < 2 or images.shape[1] != 3:
        raise PeftConfigError(f"export: the sample must be (N >= 2, 3, H, W), got {tuple(images.shape)}")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, FORMATS[fmt])
    batch = torch.export.Dim("batch", min=1, max=4096)
    backend = msda_backend_for(fmt, msda, images.device.type)
    with _msda_backend(backend), torch.no_grad(), warnings.catch_warnings():
        # jit tracing warns where Python ints are read from tensors (the levels' sizes: fixed by the image size)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*(jit.trace|TorchScript-based ONNX).*deprecated")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.onnx")
        if fmt == "torch_export":
            program = torch.export.export(module, (images,), dynamic_shapes={"images": {0: batch}})
            torch.export.save(program, path)
        elif fmt == "torchscript":
            torch.jit.trace(module, (images,), check_trace=False).save(path)
        else:
            torch.onnx.export(module, (images,), path, dynamo=False, input_names=["images"],
                              output_names=list(OUTPUT_NAMES), opset_version=ONNX_OPSET,
                              dynamic_axes={n: {0: "batch"} for n in ("images", *OUTPUT_NAMES)})
    return path


def load(path: str, fmt: str, threads: int = 0):
    """A callable images -> the five outputs (torch tensors, on the CPU for ONNX Runtime) of an exported model.
    threads: ONNX Runtime's intra-op threads (0: its default)."""
    if fmt == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return lambda images: tuple(torch.from_numpy(o) for o in session.run(None, {"images": images.cpu().numpy()}))
    ops.load_extension()  # a program holding the compiled operator needs its registration
    if fmt == "torch_export":
        return torch.export.load(path).module()
    if fmt == "torchscript":
        return torch.jit.load(path)
    raise PeftConfigError(f"export: unknown format {fmt!r}; expected one of {sorted(FORMATS)}")


def differences(expected, got) -> dict:
    """{output: largest absolute difference} for the float outputs; for pred_classes and instance_masks the
    number of differing entries (a near-tie in scores may swap two instances' places)."""
    out = {}
    for name, a, b in zip(OUTPUT_NAMES, expected, got):
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"exported output {name} has shape {tuple(b.shape)}, expected {tuple(a.shape)}")
        b = b.to(a.device)
        if a.is_floating_point():
            out[name] = float((a - b.to(a.dtype)).abs().max()) if a.numel() else 0.0
        else:
            out[name] = int((a != b.to(a.dtype)).sum())
    return out


def write_manifest(output_dir: str, manifest: dict) -> str:
    """OUTPUT_DIR/export.json, written atomically (a reader never sees half of it)."""

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)

    return atomic_write(os.path.join(output_dir, "export.json"), write)
