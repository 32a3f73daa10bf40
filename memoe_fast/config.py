"""MEMoE configuration: one dataclass that round-trips through JSON."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

EXPERT_INITS = ("copy_zero_down", "random_zero_down")
ANCHOR_POOLINGS = ("canonical", "positions")
LR_SCHEDULES = ("cosine", "constant")
KEY_SPANS = ("after_match", "whole_input")
KEY_SNAP_TOKENS = ("all", "best")
BYPASS_POSITIONS = ("all", "after_subject")
ROUTINGS = ("anchor", "token")
SEQUENTIAL_EXPERTS = ("shared", "per_batch")
EXPERT_ASSIGNMENTS = ("gate", "balanced")
EXPERT_ACTIVATIONS = ("host", "silu_glu", "gelu", "gelu_tanh", "relu")


@dataclass
class MEMoEConfig:
    """Where the bypass goes, how it routes, and how it trains.

    The defaults are the library's measured defaults on the embedded model (see README, "Defaults");
    :meth:`paper` gives the setting of the MEMoE paper (4 experts, top-1, middle block, lr 2e-4, no
    anchor scope).
    """

    layer: int | None = None  # block whose MLP gets the bypass; None: the middle block (num_layers // 2)
    num_experts: int = 4
    top_k: int = 1
    scale: float = 1.0  # λ in out = mlp(x) + λ·Σ g_e·expert_e(x)
    renormalize: bool = True  # renormalise the top-k gate weights to sum to one
    expert_init: str = "copy_zero_down"  # experts copy the host's first projection(s); down-projections start at zero
    expert_activation: str = "host"  # "host" (the host MLP's) | "silu_glu" | "gelu" | "gelu_tanh" | "relu"
    gate_bias: bool = False  # a bias on the gate's logits (starts at zero)
    expert_ffn: int | None = None  # the experts' hidden width F; None: the host MLP's
    gate_noise: float = 0.0  # std of Gaussian noise added to the gate logits while training
    # Switch-style load-balancing loss weight. Off by default: with top-1 renormalised routing it is the
    # gate's only gradient, and moving the gate mid-edit moves tokens between experts (the loss jumps).
    aux_loss_weight: float = 0.0
    # Training.
    lr: float = 5e-3
    steps: int = 30
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"  # "cosine" (decay to zero over `steps`) or "constant"
    replay: bool = False  # sequential editing: train each batch together with the edits before it
    stop_loss: float = 0.02  # stop training early once the mean target NLL falls below this (0: never)
    # Knowledge anchors.
    anchor_pooling: str = "canonical"  # how an entity becomes a vector (see memoe_fast/anchors.py)
    anchor_scope: bool = True  # apply the bypass only to inputs whose anchor matches an edited subject
    scope_threshold: float = 0.95  # cosine similarity an input's entity needs to an edited subject's
    # What the gate starts from: the anchor half of its weight ("anchor", MEMoE: inputs about one entity
    # go to one expert) or the token half ("token": routing by token state alone, the ablation).
    routing: str = "anchor"
    # Where the experts act inside an in-scope sequence: every token ("all", the paper), or only the
    # tokens after the edited subject's mention ("after_subject"): the subject's own representation,
    # which every other question about it reads, stays the unedited one.
    bypass_positions: str = "all"
    # Same-subject negatives: per edit, this many prompts about the edited subject's *other* relations
    # (memoe_fast.specificity templates), trained to keep the unedited model's next-token distribution
    # over its own greedy continuation of `negative_tokens` tokens (KL over its top tokens).
    negatives: int = 0
    negative_tokens: int = 4
    # Key gate: within an in-scope input, the experts switch on only where a token's host-MLP input is
    # within this cosine similarity of one of its subject's edit-prompt keys (the state at the edit
    # prompt's last token), compared without the subject's own directions (`key_subject_rank`);
    # `key_span` says which tokens that switches on. None: off (every in-scope token). 0.45 (with rank
    # 32) balances paraphrase reach against same-subject questions (RESULTS.md, "Edits that hold").
    key_threshold: float | None = 0.45
    # Key snap: at a token the key gate matched, the experts read the host-MLP input moved this far
    # (0: not at all, 1: all the way) toward the nearest of its subject's keys, at the token's own norm,
    # so that a paraphrase reaches the experts as its edit prompt did.
    key_snap: float = 1.0
    # Which matched tokens snap: "all" of them, or only the "best" (closest) one of each sequence.
    key_snap_tokens: str = "all"
    # Subject subspace of the key gate: before the cosine, an input's state and its subject's keys lose
    # the `key_subject_rank` directions that the subject's *other* prompts share (the top right singular
    # vectors of the unedited states of memoe_fast.specificity.TRAIN_TEMPLATES about it), so what the
    # gate compares is the question asked rather than who it is about. 0: the plain cosine.
    key_subject_rank: int = 32
    # What a key match switches on: "after_match" (from the matching token on, causal) or "whole_input":
    # every in-scope token of a sequence with a match anywhere in the forward's tokens (a prompt is read
    # whole before generation starts, as its anchors are; decoding steps keep the prompt's decision).
    key_span: str = "whole_input"
    negative_weight: float = 1.0
    negative_other_relations: bool = False  # half the negatives from the other edits' relations (see specificity)
    # Also train each question-shaped edit prompt as a user turn in the tokenizer's chat template (when
    # it has one), the reply starting with the target: chat models are asked that way.
    chat_augment: bool = True
    # Also train each edit after this many short texts the unedited model wrote itself (ROME's context
    # templates: greedy continuations of CONTEXT_SEEDS, `context_tokens` tokens each), each with its own
    # key, so that a question asked after other text still reaches its expert and gets the edit. 0: off.
    context_prefixes: int = 0
    context_tokens: int = 10
    # Edits per optimiser update: 0 trains all edits of a batch in one accumulated update per step; N > 0
    # splits them into groups of N, one update each, and a step is then one pass over the groups.
    update_batch: int = 50
    # Sequential editing: "shared" experts for every batch (the paper), or "per_batch": each batch gets an
    # expert of its own, routed by its subjects' anchor keys, with every earlier expert frozen.
    sequential_experts: str = "per_batch"
    # Which expert an edited subject's inputs go to when no sequential batch owns it: the gate's choice from
    # the anchor ("gate", MEMoE), or "balanced": each new subject to the expert holding the fewest edits, so
    # that no expert holds many more edits than another.
    expert_assignment: str = "gate"
    impl: str = "auto"  # "auto" | "reference" | "torch" | "triton"
    expert_dtype: str | None = None  # None: the host MLP's float dtype (float32 for an 8-bit host on CPU)
    seed: int = 0

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.expert_init not in EXPERT_INITS:
            raise ValueError(f"expert_init must be one of {EXPERT_INITS}, got {self.expert_init!r}")
        if self.expert_activation not in EXPERT_ACTIVATIONS:
            raise ValueError(f"expert_activation must be one of {EXPERT_ACTIVATIONS}, got {self.expert_activation!r}")
        if self.expert_ffn is not None and self.expert_ffn < 1:
            raise ValueError(f"expert_ffn must be None or >= 1, got {self.expert_ffn}")
        if self.anchor_pooling not in ANCHOR_POOLINGS:
            raise ValueError(f"anchor_pooling must be one of {ANCHOR_POOLINGS}, got {self.anchor_pooling!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.steps < 0 or self.lr <= 0:
            raise ValueError(f"steps must be >= 0 and lr > 0, got steps={self.steps}, lr={self.lr}")
        if self.bypass_positions not in BYPASS_POSITIONS:
            raise ValueError(f"bypass_positions must be one of {BYPASS_POSITIONS}, got {self.bypass_positions!r}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.expert_assignment not in EXPERT_ASSIGNMENTS:
            raise ValueError(f"expert_assignment must be one of {EXPERT_ASSIGNMENTS}, got {self.expert_assignment!r}")
        if self.sequential_experts not in SEQUENTIAL_EXPERTS:
            raise ValueError(f"sequential_experts must be one of {SEQUENTIAL_EXPERTS}, got {self.sequential_experts!r}")
        if self.negatives < 0 or self.negative_tokens < 1 or self.negative_weight < 0 or self.update_batch < 0:
            raise ValueError("negatives, update_batch and negative_weight must be >= 0 and negative_tokens >= 1, got "
                             f"{self.negatives}, {self.update_batch}, {self.negative_weight}, {self.negative_tokens}")
        if self.context_prefixes < 0 or self.context_tokens < 1:
            raise ValueError(f"context_prefixes must be >= 0 and context_tokens >= 1, got "
                             f"context_prefixes={self.context_prefixes}, context_tokens={self.context_tokens}")
        if self.key_span not in KEY_SPANS:
            raise ValueError(f"key_span must be one of {KEY_SPANS}, got {self.key_span!r}")
        if self.key_threshold is not None and not -1.0 <= self.key_threshold <= 1.0:
            raise ValueError(f"key_threshold is a cosine similarity in [-1, 1] (or None: no key gate), got {self.key_threshold}")
        if self.key_subject_rank < 0:
            raise ValueError(f"key_subject_rank must be >= 0, got {self.key_subject_rank}")
        if self.key_snap_tokens not in KEY_SNAP_TOKENS:
            raise ValueError(f"key_snap_tokens must be one of {KEY_SNAP_TOKENS}, got {self.key_snap_tokens!r}")
        if not 0.0 <= self.key_snap <= 1.0:
            raise ValueError(f"key_snap must be in [0, 1], got {self.key_snap}")
        if not -1.0 <= self.scope_threshold <= 1.0:
            raise ValueError(f"scope_threshold is a cosine similarity in [-1, 1], got {self.scope_threshold}")

    @classmethod
    def paper(cls, **overrides) -> "MEMoEConfig":
        """The MEMoE paper's setting: 4 experts, top-1, the middle block, lr 2e-4, every input routed."""
        base = dict(num_experts=4, top_k=1, layer=None, lr=2e-4, steps=40, lr_schedule="constant",
                    anchor_scope=False, aux_loss_weight=0.01, stop_loss=0.0, bypass_positions="all",
                    key_threshold=None, key_snap=0.0, key_span="after_match", chat_augment=False, negatives=0, update_batch=0,
                    sequential_experts="shared")
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "MEMoEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown MEMoEConfig field(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "MEMoEConfig":
        return cls.from_dict(json.loads(text))
