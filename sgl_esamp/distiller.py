"""The Distiller: a low-rank gated residual block, one per slot, stacked into a bank.

For a shallow hidden state x the Distiller of slot s predicts a deep one (which states
these are is the variant's choice, see variants.py):

    ŷ = LN_s( x + ((x A_s) ⊙ SiLU(x G_s + b_s)) B_s )

with A_s, G_s ∈ R^{H×r}, b_s ∈ R^r, B_s ∈ R^{r×H}, and LN_s a LayerNorm whose gain
and bias are per slot too. Every slot's parameters live in one stacked tensor so that
one batched forward/backward serves every group of a decode step:

    A, G: [H, S, r]   (slot-major inside each input row: x @ A.view(H, S*r) is one GEMM)
    b:    [S, r]
    B:    [S, r, H]   (B.view(S*r, H) is the matching output GEMM)
    gain, bias: [S, H]

Row i only ever touches the r columns of its own slot: its activations are gathered
from the [N, S*r] product and scattered back into a zero [N, S*r] block before B, so
gradients of one slot never reach another. The cost is a GEMM of width S*r instead
of r; for S*r of a few thousand that stays far below one decoder layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

LN_EPS = 1e-5


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
    """Parameters of S Distillers stacked over slots, with a batched forward."""

    PARAM_SLOT_DIM = {"A": 1, "G": 1, "b": 0, "B": 0, "gain": 0, "bias": 0}

    def __init__(self, init: DistillerInit, num_slots: int, device: torch.device | str, dtype: torch.dtype):
        self.hidden_size, self.rank = init.A.shape
        self.num_slots = num_slots
        self.device = torch.device(device)
        self.dtype = dtype
        self.init = DistillerInit(**{k: v.to(self.device, dtype) for k, v in vars(init).items()})
        S = num_slots
        self.params: dict[str, torch.Tensor] = {
            "A": self.init.A.unsqueeze(1).repeat(1, S, 1).contiguous(),
            "G": self.init.G.unsqueeze(1).repeat(1, S, 1).contiguous(),
            "b": self.init.b.repeat(S, 1),
            "B": self.init.B.repeat(S, 1, 1),
            "gain": self.init.gain.repeat(S, 1),
            "bias": self.init.bias.repeat(S, 1),
        }

    def reset_slots(self, slots: torch.Tensor) -> None:
        """Return the given slots' parameters to the initial weights (device-side, no sync)."""
        for name, param in self.params.items():
            start = getattr(self.init, name).unsqueeze(self.PARAM_SLOT_DIM[name])
            shape = list(param.shape)
            shape[self.PARAM_SLOT_DIM[name]] = slots.numel()
            param.index_copy_(self.PARAM_SLOT_DIM[name], slots, start.expand(shape))

    def slot_params(self, slot: int) -> dict[str, torch.Tensor]:
        """One slot's parameters (views), for inspection and tests."""
        return {k: p.select(self.PARAM_SLOT_DIM[k], slot) for k, p in self.params.items()}

    def forward(self, x: torch.Tensor, slots: torch.Tensor, params: Optional[dict] = None) -> torch.Tensor:
        """Predict the deep state for each row of x [N, H] with the Distiller of slots[N].

        Rows with slot < 0 are computed with slot 0 and must be ignored by the caller;
        clamping instead of filtering keeps the shape static and the host out of it.
        """
        p = self.params if params is None else params
        N, H = x.shape
        S, r = self.num_slots, self.rank
        x = x.to(self.dtype)
        slot = slots.clamp_min(0).long()
        rows = torch.arange(N, device=x.device)
        xa = (x @ p["A"].view(H, S * r)).view(N, S, r)[rows, slot]
        xg = (x @ p["G"].view(H, S * r)).view(N, S, r)[rows, slot] + p["b"][slot]
        h = xa * F.silu(xg)
        spread = torch.zeros(N, S, r, device=x.device, dtype=self.dtype)
        spread = spread.index_put((rows, slot), h)
        delta = spread.view(N, S * r) @ p["B"].view(S * r, H)
        z = F.layer_norm(x + delta, (H,), eps=LN_EPS)
        return z * p["gain"][slot] + p["bias"][slot]
