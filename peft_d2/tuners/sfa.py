"""SFA: selective feature adapters (Deng et al., 2023; see docs/methods.md; the procedure is our design).

Two kinds of trainable parameters under one budget that is never exceeded:
- external adapters: bottleneck adapters after the MLP of the last backbone blocks, as many blocks (counted
  from the last) as fit in `adapter_fraction` of the budget;
- internal adapters: a fixed sparse set of pretrained weights made trainable, W = W_0 + M * Delta, chosen by
  a lottery-ticket procedure (`select_internal`): train the candidates fully for a short warm-up from the
  pretrained weights, score every entry by |W_k - W_0| (or |grad * W| summed over the warm-up), keep the top
  entries (globally or per layer) as the mask M, and reset the weights to W_0.
A layer holds its selection as `sfa_index` (a buffer of flat indices into its weight) and the trainable
values `sfa_delta` at those indices, so the trainable count is exactly the number of mask entries; the
indices travel in the adapter checkpoint, and merging folds M * Delta into W_0.
"""

import fnmatch
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import sites
from ..errors import PeftConfigError
from .adapter import AdapterConfig, adapter_parameter_count, attach_sequential_adapter
from .base import PeftMethod, Plan, option, register_method

SCORES = ("magnitude", "grad")
RANKINGS = ("global", "layer")

logger = logging.getLogger(__name__)


@dataclass
class SFAConfig:
    """Attributes:
    budget: total trainable parameters of SFA (internal + external); 0 = `budget_ratio` of the model.
    budget_ratio: budget as a fraction of all model parameters, when `budget` is 0.
    adapter_fraction: share of the budget for external adapters (the rest for internal weights).
    adapter_bottleneck: width of each external adapter.
    targets: glob patterns over module paths of the candidate nn.Linear layers for internal adapters.
    warmup_iters: k, warm-up iterations of full training of the candidates.
    warmup_lr: learning rate of the warm-up (SGD with momentum 0.9).
    score: "magnitude" (|W_k - W_0|) or "grad" (sum over the warm-up of |grad * W|).
    ranking: "global" (one top-k over all candidates) or "layer" (the same fraction of each layer).
    seed: makes the warm-up, and so the selection, reproducible.
    """

    budget: int = option(0, "total trainable SFA parameters (internal + external); 0: BUDGET_RATIO of the model")
    budget_ratio: float = option(0.01, "budget as a fraction of all model parameters, when BUDGET is 0")
    adapter_fraction: float = option(0.5, "share of the budget for external adapters")
    adapter_bottleneck: int = option(16, "width of each external adapter")
    targets: tuple = option(("*.attn.qkv", "*.attn.proj", "*.mlp.fc1", "*.mlp.fc2"),
                            "glob patterns over module paths of the candidate `nn.Linear` layers for internal adapters")
    warmup_iters: int = option(20, "warm-up iterations of full training of the candidates (>= 1)")
    warmup_lr: float = option(1e-2, "learning rate of the warm-up (SGD with momentum 0.9)")
    score: str = option("magnitude", "`magnitude` (abs(W_k - W_0)) or `grad` (sum over the warm-up of abs(grad * W))")
    ranking: str = option("global", "`global` (one top-k over all candidates) or `layer` (the same fraction of each)")
    seed: int = option(0, "seed of the warm-up, and so of the selection")

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if self.budget < 0 or (self.budget == 0 and not 0 < self.budget_ratio < 1):
            raise PeftConfigError(
                f"MODEL.PEFT.SFA.BUDGET must be > 0, or 0 with MODEL.PEFT.SFA.BUDGET_RATIO in (0, 1); got "
                f"{self.budget!r} and {self.budget_ratio!r}"
            )
        if not 0 <= self.adapter_fraction <= 1:
            raise PeftConfigError(f"MODEL.PEFT.SFA.ADAPTER_FRACTION must be in [0, 1], got {self.adapter_fraction!r}")
        if self.score not in SCORES:
            raise PeftConfigError(f"MODEL.PEFT.SFA.SCORE must be one of {SCORES}, got {self.score!r}")
        if self.ranking not in RANKINGS:
            raise PeftConfigError(f"MODEL.PEFT.SFA.RANKING must be one of {RANKINGS}, got {self.ranking!r}")
        if self.warmup_iters < 1:
            raise PeftConfigError(f"MODEL.PEFT.SFA.WARMUP_ITERS must be >= 1, got {self.warmup_iters!r}")

    def total_budget(self, model: nn.Module) -> int:
        if self.budget > 0:
            return self.budget
        return int(self.budget_ratio * sum(p.numel() for p in model.parameters()))


class SFALinear(nn.Linear):
    """nn.Linear whose weight is W_0 + M * Delta for a fixed sparse mask M. Built in place by `wrap`."""

    peft_method = "sfa"
    peft_tensor_prefixes = ("sfa_",)  # its own tensors an adapter file holds (sfa_index is a buffer)

    @classmethod
    def wrap(cls, linear: nn.Linear, index: torch.Tensor) -> "SFALinear":
        linear.__class__ = cls
        linear.register_buffer("sfa_index", index.to(device=linear.weight.device, dtype=torch.long))
        linear.sfa_delta = nn.Parameter(torch.zeros(index.numel(), device=linear.weight.device,
                                                    dtype=linear.weight.dtype))
        linear.sfa_merged = False
        return linear

    def delta_weight(self) -> torch.Tensor:
        flat = torch.zeros(self.weight.numel(), device=self.weight.device, dtype=self.sfa_delta.dtype)
        return flat.index_add(0, self.sfa_index, self.sfa_delta).view_as(self.weight)

    def forward(self, x):
        if self.sfa_merged:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight + self.delta_weight().to(self.weight.dtype), self.bias)

    @torch.no_grad()
    def merge(self):
        if not self.sfa_merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.sfa_merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.sfa_merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.sfa_merged = False


def candidate_layers(model: nn.Module, cfg: SFAConfig) -> list:
    """(path, nn.Linear) of the candidates, in module order."""
    found = [(p, m) for p, m in model.named_modules()
             if type(m) is nn.Linear and any(fnmatch.fnmatchcase(p, t) for t in cfg.targets)]
    if not found:
        raise PeftConfigError(f"MODEL.PEFT.SFA.TARGETS {list(cfg.targets)} match no nn.Linear of the model")
    return found


def select_internal(model: nn.Module, cfg: SFAConfig, loss_fn, num_entries: int) -> dict:
    """The lottery-ticket selection: {module path: sorted flat indices into its weight}, num_entries in all.

    `loss_fn(model) -> scalar` draws a batch and returns the training loss (it is called `warmup_iters` times).
    The model's parameters and requires_grad flags are restored afterwards: only the selection remains.
    """
    layers = candidate_layers(model, cfg)
    params = [m.weight for _, m in layers]
    w0 = [p.detach().clone() for p in params]
    saved_flags = {id(p): p.requires_grad for p in model.parameters()}
    saved_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    # SGD, not Adam: Adam's first steps move every weight by about lr, so |W_k - W_0| would rank nothing
    opt = torch.optim.SGD(params, lr=cfg.warmup_lr, momentum=0.9)
    grad_scores = [torch.zeros_like(p) for p in params]
    was_training = model.training
    model.train()
    fork_devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    losses, start = [], time.perf_counter()
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(cfg.seed)
        for _ in range(cfg.warmup_iters):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model)
            loss.backward()
            losses.append(float(loss.detach()))
            for s, p in zip(grad_scores, params):
                if p.grad is not None:
                    s.add_((p.grad * p.detach()).abs())
            opt.step()
    logger.info(f"SFA warm-up: {cfg.warmup_iters} iterations of SGD (lr {cfg.warmup_lr}) on {len(layers)} candidate "
                f"layers ({sum(p.numel() for p in params):,} weights), loss {losses[0]:.4g} -> {losses[-1]:.4g}, "
                f"{time.perf_counter() - start:.1f} s")
    if cfg.score == "magnitude":
        scores = [(p.detach() - w).abs() for p, w in zip(params, w0)]
    else:
        scores = grad_scores
    model.load_state_dict(saved_state)  # reset to W_0 (and anything else the warm-up touched)
    for p in model.parameters():
        p.requires_grad_(saved_flags[id(p)])
    model.train(was_training)
    return _top_entries([p for p, _ in layers], scores, num_entries, cfg.ranking)


def _top_entries(paths, scores, num_entries, ranking) -> dict:
    flat = [s.flatten().float() for s in scores]
    total = sum(f.numel() for f in flat)
    num_entries = min(num_entries, total)
    if ranking == "global":
        top = torch.topk(torch.cat(flat), num_entries, sorted=False).indices
        bounds = torch.tensor([0] + [f.numel() for f in flat]).cumsum(0)
        out = {}
        for i, path in enumerate(paths):
            sel = top[(top >= bounds[i]) & (top < bounds[i + 1])] - bounds[i]
            out[path] = torch.sort(sel).values
        return out
    out, left = {}, num_entries  # per layer: the same fraction of each, rounded down, never over the budget
    for path, f in zip(paths, flat):
        k = min(int(num_entries * f.numel() / total), left)
        out[path] = torch.sort(torch.topk(f, k, sorted=False).indices).values
        left -= k
    return out


def plan_external(model: nn.Module, cfg: SFAConfig, budget: int):
    """(blocks, parameter count) of the external adapters: one after the MLP of each of the last backbone
    blocks, counted from the last backwards while they fit in `adapter_fraction` of the budget."""
    blocks = [(p, b) for p, b in model.named_modules() if sites.is_transformer_block(b)]
    chosen, used = [], 0
    for path, block in reversed(blocks):
        n = adapter_parameter_count(sites.block_dim(block), cfg.adapter_bottleneck)
        if used + n > cfg.adapter_fraction * budget:
            break
        chosen.insert(0, (path, block))
        used += n
    return chosen, used


def select(model: nn.Module, cfg: SFAConfig, loss_fn) -> dict:
    """Plan the external adapters, then select the internal weights with what is left of the budget
    (`select_internal`). Run on the base model before `peft_d2.inject(..., sfa_selection=...)`."""
    budget = cfg.total_budget(model)
    blocks, adapter_params = plan_external(model, cfg, budget)
    logger.info(f"SFA budget: {budget:,} parameters; external adapters (width {cfg.adapter_bottleneck}) after the "
                f"MLP of the last {len(blocks)} blocks: {adapter_params:,}; internal weights: "
                f"{budget - adapter_params:,}, chosen by |{'W_k - W_0' if cfg.score == 'magnitude' else 'grad * W'}| "
                f"({cfg.ranking} ranking) after a warm-up")
    selection = select_internal(model, cfg, loss_fn, budget - adapter_params)
    counts = sorted(((int(idx.numel()), path) for path, idx in selection.items() if idx.numel()), reverse=True)
    most = f"; most in {', '.join(f'{path} ({n:,})' for n, path in counts[:3])}" if counts else ""
    logger.info(f"SFA selection: {sum(n for n, _ in counts):,} internal weights in {len(counts)} of {len(selection)} "
                f"candidate layers{most}")
    return selection


def random_selection(model: nn.Module, cfg: SFAConfig, seed: int = 0) -> dict:
    """A selection of the budgeted size with random scores: for counting parameters and timing steps, where
    which weights are chosen does not matter (training uses `select`)."""
    budget = cfg.total_budget(model)
    _, adapter_params = plan_external(model, cfg, budget)
    layers = candidate_layers(model, cfg)
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(m.weight.shape, generator=g) for _, m in layers]
    return _top_entries([p for p, _ in layers], scores, budget - adapter_params, cfg.ranking)


@register_method
class SFAMethod(PeftMethod):
    """External adapters after the MLP of the last blocks, and the selected internal weights (the input
    `sfa_selection` of `peft_d2.inject`: {module path: flat indices}, from `select` or an adapter file). It is
    planned first, on the bare base model, whose parameter count its budget is a fraction of."""

    name, config_class, order, mergeable, inputs = "sfa", SFAConfig, 0, True, ("selection",)

    def plan(self, model, cfg, planned, selection=None):
        if selection is None:
            raise PeftConfigError(
                "MODEL.PEFT.METHODS 'sfa' needs its internal selection: run peft_d2.tuners.sfa.select(model, cfg, "
                "loss_fn) on the base model (the trainer does it from MODEL.PEFT.SFA), or load an SFA adapter file"
            )
        budget = cfg.total_budget(model)
        blocks, adapter_params = plan_external(model, cfg, budget)
        internal = sum(int(idx.numel()) for idx in selection.values())
        if internal + adapter_params > budget:
            raise PeftConfigError(
                f"MODEL.PEFT.SFA.BUDGET: {internal} internal + {adapter_params} adapter parameters exceed the "
                f"budget {budget}"
            )
        modules = dict(model.named_modules())
        for path in selection:
            if type(modules.get(path)) is not nn.Linear:
                raise PeftConfigError(f"SFA selection names '{path}', which is no nn.Linear of the model")
        internal_sites = [(path, modules[path], idx) for path, idx in selection.items() if idx.numel()]
        return Plan(converts=[p for p, *_ in internal_sites], adds=[(f"{p}.mlp", "adapter") for p, _ in blocks],
                    sites=(budget, internal_sites, blocks))

    def apply(self, model, cfg, plan):
        budget, internal_sites, blocks = plan.sites
        cfg.budget = budget  # saved with the config: a reload plans the same adapters
        for _, linear, idx in internal_sites:
            SFALinear.wrap(linear, idx)
        adapter_cfg = AdapterConfig(num_per_site=1, bottleneck=cfg.adapter_bottleneck, placements=("mlp",))
        for _, block in blocks:
            attach_sequential_adapter(block.mlp, sites.block_dim(block), adapter_cfg)

    def merge_deltas(self, model):
        return {f"{path}.weight": m.delta_weight() for path, m in self.layers(model) if not m.sfa_merged}

    def inputs_from_adapter_file(self, tensors):
        return {"selection": {k[: -len(".sfa_index")]: t for k, t in tensors.items() if k.endswith(".sfa_index")}}
