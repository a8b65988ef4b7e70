"""The Distiller: a low-rank gated residual block, one per slot, stacked into a bank.

For a shallow hidden state x the Distiller of slot s predicts a deep one (which states
these are is the variant's choice, see variants.py):

    ŷ = LN_s( x + ((x A_s) ⊙ SiLU(x G_s + b_s)) B_s )

with A_s, G_s ∈ R^{H×r}, b_s ∈ R^r, B_s ∈ R^{r×H}, and LN_s a LayerNorm whose gain
and bias are per slot too. All of a slot's parameters are one row of a flat [S + 1, P]
tensor (A, G, b, B, gain, bias, row-major; the spare last row takes writes that must land
nowhere), so gathering, resetting and the optimizer are one operation each.

A step touches only the slots that have rows in it (layout.py). This module is the torch
path, the one the CPU runs: the step's distinct slots' parameters are gathered (a slot
reassigned this step reads the initial weights instead, so a reset costs no extra work),
the rows are scattered into a [D, width, H] block, and three batched GEMMs compute every
group's Distiller at once. kernels/distiller.py does the same on a GPU without the
gather or the blocks; tests hold the two to each other.

The backward is written out (`DistillerBank.backward`) rather than left to autograd: it is
a dozen ops on the forward's saved activations, where autograd would record a graph node
per op and, on CUDA, hand the backward to its own thread; tests hold it to autograd's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .layout import StepLayout

LN_EPS = 1e-5


class BlockForward(NamedTuple):
    """The torch forward over blocks [D, W, H] of a step's pair rows (segment d with slot
    distinct[d]'s parameters): the prediction, the parameters it used and the activations the
    backward needs. Training on the rows a step has just predicted starts from it."""

    flat: torch.Tensor  # [D, P] the parameters used (the initial weights for fresh slots)
    params: dict[str, torch.Tensor]  # views of flat by name
    x: torch.Tensor  # [D, W, H] the rows, zero past each segment's
    up: torch.Tensor  # [D, W, r] x A
    gate: torch.Tensor  # [D, W, r] x G + b
    gate_act: torch.Tensor  # [D, W, r] SiLU(gate)
    h: torch.Tensor  # [D, W, r] up ⊙ gate_act
    u: torch.Tensor  # [D, W, H] x + h B, the LayerNorm's input
    mean: torch.Tensor  # [D, W, 1] its statistics
    rstd: torch.Tensor  # [D, W, 1]
    normed: torch.Tensor  # [D, W, H] LN(u) before gain and bias
    prediction: torch.Tensor  # [D, W, H] ŷ

    def rows(self, layout: StepLayout) -> torch.Tensor:
        """ŷ [M, H] of the step's pair rows, in layout order."""
        return self.prediction[layout.segment, layout.position]


@dataclass
class DistillerInit:
    """The weights every slot starts from (and returns to when it is reused)."""

    A: torch.Tensor  # [H, r]
    G: torch.Tensor  # [H, r]
    b: torch.Tensor  # [r]
    B: torch.Tensor  # [r, H]
    gain: torch.Tensor  # [H]
    bias: torch.Tensor  # [H]


def zero_delta_init(
    hidden_size: int,
    rank: int,
    *,
    seed: int = 0,
    norm_weight: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
) -> DistillerInit:
    """B = 0, so the first prediction is LN(x); A and G are small random so B gets gradients.

    The LayerNorm gain starts from `norm_weight` when given: the norm that produced the
    target (a normed state), whose weight sets its per-channel scale.
    """
    gen = torch.Generator().manual_seed(seed)
    scale = hidden_size**-0.5
    A = torch.randn(hidden_size, rank, generator=gen, dtype=torch.float64) * scale
    G = torch.randn(hidden_size, rank, generator=gen, dtype=torch.float64) * scale
    gain = torch.ones(hidden_size) if norm_weight is None else norm_weight.detach().float().cpu()
    return DistillerInit(
        A=A.to(dtype),
        G=G.to(dtype),
        b=torch.zeros(rank, dtype=dtype),
        B=torch.zeros(rank, hidden_size, dtype=dtype),
        gain=gain.to(dtype),
        bias=torch.zeros(hidden_size, dtype=dtype),
    )


def normal_init(
    hidden_size: int,
    rank: int,
    *,
    seed: int = 0,
    std: float = 0.02,
    gate_bias: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> DistillerInit:
    """The authors' initialisation: A, G, B ~ N(0, std²), gate bias 1, LayerNorm gain 1, bias 0.

    The gate bias of 1 opens SiLU's gate from the first step, so the random residual branch
    contributes (and B gets gradients) at once."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64) * std
    A, G, B = draw(hidden_size, rank), draw(hidden_size, rank), draw(rank, hidden_size)
    return DistillerInit(
        A=A.to(dtype),
        G=G.to(dtype),
        b=torch.full((rank,), gate_bias, dtype=dtype),
        B=B.to(dtype),
        gain=torch.ones(hidden_size, dtype=dtype),
        bias=torch.zeros(hidden_size, dtype=dtype),
    )


def svd_init(
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    rank: int,
    *,
    norm_weight: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
) -> DistillerInit:
    """Start from a rank-r view of the model's last SwiGLU MLP.

    The MLP is down(SiLU(x W_gᵀ) ⊙ (x W_uᵀ)) with torch Linear weights W_g, W_u: [I, H]
    and W_d: [H, I]. With W_d ≈ U_r Σ_r V_rᵀ, projecting the intermediate channels on
    V_r gives G = W_gᵀ V_r, A = W_uᵀ V_r (both [H, r]) and B = Σ_r U_rᵀ ([r, H]).
    SiLU does not commute with rotations, so this is exact only when V_r picks single
    channels; each singular pair's sign is fixed so its dominant channel enters with +1.
    """
    hidden, inter = down_weight.shape
    if gate_weight.shape != (inter, hidden) or up_weight.shape != (inter, hidden):
        raise ValueError(
            f"svd init expects gate/up weights [{inter}, {hidden}] matching down [{hidden}, {inter}], "
            f"got {tuple(gate_weight.shape)} and {tuple(up_weight.shape)}"
        )
    if rank > min(hidden, inter):
        raise ValueError(f"svd init: rank {rank} exceeds min(H, I) = {min(hidden, inter)}")
    U, S, Vh = torch.linalg.svd(down_weight.detach().double().cpu(), full_matrices=False)
    V_r = Vh[:rank].T  # [I, r]
    sign = torch.sign(V_r.gather(0, V_r.abs().argmax(0, keepdim=True)))
    V_r, U_r = V_r * sign, U[:, :rank] * sign
    base = zero_delta_init(hidden, rank, norm_weight=norm_weight, dtype=dtype)
    base.G = (gate_weight.detach().double().cpu().T @ V_r).to(dtype)
    base.A = (up_weight.detach().double().cpu().T @ V_r).to(dtype)
    base.B = (S[:rank, None] * U_r.T).to(dtype)
    return base


class DistillerBank:
    """Parameters of S Distillers as rows of one flat [S + 1, P] tensor, with a per-slot batched forward."""

    def __init__(self, init: DistillerInit, num_slots: int, device: torch.device | str, dtype: torch.dtype):
        self.hidden_size, self.rank = init.A.shape
        self.num_slots = num_slots
        self.device = torch.device(device)
        self.dtype = dtype
        self.init = DistillerInit(**{k: v.to(self.device, dtype) for k, v in vars(init).items()})
        self.shapes = {name: tuple(start.shape) for name, start in vars(self.init).items()}
        self.init_flat = torch.cat([start.flatten() for start in vars(self.init).values()])  # [P]
        # One spare row past the last slot takes the writes that must land nowhere, so a
        # write-back keeps one shape and never asks the device which rows those are.
        self.rows = self.init_flat.unsqueeze(0).repeat(num_slots + 1, 1)  # [S + 1, P]
        self.flat = self.rows[:num_slots]  # [S, P]
        self.params: dict[str, torch.Tensor] = self.views(self.flat)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views [rows, ...] of a flat [rows, P] tensor laid out as `flat`."""
        sizes = [math.prod(shape) for shape in self.shapes.values()]
        return {name: part.view(flat.shape[0], *shape)
                for (name, shape), part in zip(self.shapes.items(), flat.split(sizes, dim=1))}

    def gather(self, layout: StepLayout) -> torch.Tensor:
        """The flat parameters [D, P] the step's segments use: their slot's, or the initial
        weights for a slot (re)assigned this step."""
        return torch.where(layout.fresh.bool().unsqueeze(1), self.init_flat, self.flat.index_select(0, layout.distinct))

    def blocks(self, x: torch.Tensor, layout: StepLayout) -> torch.Tensor:
        """Pair rows x [M, H] laid out by segment: [D, width, H], zero past each segment's rows."""
        x = x.to(self.dtype)
        block = x.new_zeros(layout.num_distinct, layout.width, x.shape[1])
        return block.index_put_((layout.segment, layout.position), x)

    def forward(self, x: torch.Tensor, layout: StepLayout) -> BlockForward:
        """Every pair row x [M, H] through its segment's Distiller."""
        return self.forward_blocks(self.blocks(x, layout), self.gather(layout))

    def forward_blocks(self, x: torch.Tensor, flat: torch.Tensor) -> BlockForward:
        """The Distiller over blocks of rows x [D, W, H], segment d with the parameters flat[d]."""
        p = self.views(flat)
        up = torch.bmm(x, p["A"])
        gate = torch.baddbmm(p["b"].unsqueeze(1), x, p["G"])
        gate_act = F.silu(gate)
        h = up * gate_act
        u = torch.baddbmm(x, h, p["B"])
        normed, mean, rstd = torch.native_layer_norm(u, [x.shape[-1]], None, None, LN_EPS)
        prediction = torch.addcmul(p["bias"].unsqueeze(1), normed, p["gain"].unsqueeze(1))
        return BlockForward(flat, p, x, up, gate, gate_act, h, u, mean, rstd, normed, prediction)

    def backward(self, forward: BlockForward, grad_prediction: torch.Tensor) -> torch.Tensor:
        """Gradients [D, P] (laid out as `flat`) of Σ grad_prediction · ŷ with respect to each
        segment's parameters, from the forward that computed ŷ."""
        f, p = forward, forward.params
        grads = {"gain": (grad_prediction * f.normed).sum(1), "bias": grad_prediction.sum(1)}
        grad_u = torch.ops.aten.native_layer_norm_backward(
            grad_prediction * p["gain"].unsqueeze(1), f.u, [f.u.shape[-1]], f.mean, f.rstd,
            None, None, [True, False, False])[0]
        grads["B"] = torch.bmm(f.h.transpose(1, 2), grad_u)
        grad_h = torch.bmm(grad_u, p["B"].transpose(1, 2))
        grad_gate = torch.ops.aten.silu_backward(grad_h * f.up, f.gate)
        x_t = f.x.transpose(1, 2)
        grads["A"] = torch.bmm(x_t, grad_h * f.gate_act)
        grads["G"] = torch.bmm(x_t, grad_gate)
        grads["b"] = grad_gate.sum(1)
        return torch.cat([grads[name].flatten(1) for name in self.shapes], dim=1)
