"""How well does the online Distiller predict, and how far does fusion move the distribution?

Offline diagnostic on a Hugging Face model (transformers, CPU is fine), of the latent
variant (source: a layer's block output; target: the final normed state): n samples of
one prompt are decoded in lockstep as one ESamp group (one slot), exactly as the server
does it, and per decode step we record (the server reports the same signal for both
variants in meta_info["esamp"]["signal"])

  rel_mse   MSE(ŷ, y) / mean(y²): 1 = no better than predicting 0, 0 = perfect;
  corr      Pearson correlation of d = W[c]·ŷ with z over the kept candidates;
  kl        KL(q || p) between the fused and the plain kept distribution;
  flip      share of rows whose most probable candidate changes under fusion.

    python benchmarks/probe_distiller.py --layers 0 8 15 --betas 0.3 --prompt-train 0 1
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sgl_esamp import LATENT, ESampConfig, ESampSampler, ESampStep, PairRow, filter_candidates
from sgl_esamp.tools.default_model import materialize_smollm2

PROMPTS = {
    "writing": "Write a short poem about a lighthouse keeper who has never seen the sea.",
    "arithmetic": "What is 7 + 5 - 3? End with 'Answer: X'.",
}


@torch.no_grad()
def run(model, tok, prompt: str, layer: int, beta: float, n: int, steps: int, temperature: float,
        prompt_train: int, lr: float, min_p: float, init: str, top_p: float) -> dict:
    cfg = ESampConfig(beta=beta, source_layer=layer, num_slots=1, lr=lr, init=init)
    head = model.get_output_embeddings().weight.detach().float()
    mlp = model.model.layers[-1].mlp
    last_mlp = tuple(m.weight.detach().float() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    esamp = ESampSampler(cfg, head, variant=LATENT, target_norm_weight=model.model.norm.weight.detach().float(),
                         last_mlp=last_mlp)
    rows = [("g", i) for i in range(n)]
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids.repeat(n, 1)
    gen = torch.Generator().manual_seed(0)
    out = model(ids, use_cache=True, output_hidden_states=True)
    if prompt_train:  # steps on the prompt's own (x, y) pairs before the first token
        x, y = out.hidden_states[layer + 1][0].float(), out.hidden_states[-1][0].float()
        for _ in range(prompt_train):
            slot = esamp.assign_slots(rows[:1])[0]
            esamp.learn(ESampStep.tapped(esamp.layout([PairRow(i, slot, True) for i in range(len(x))]), x, y))
    past = out.past_key_values
    rows = {k: [] for k in ("rel_mse", "corr", "kl", "flip")}
    temps = torch.full((n,), temperature)
    for _ in range(steps):
        x = out.hidden_states[layer + 1][:, -1].float()
        y = out.hidden_states[-1][:, -1].float()
        z = out.logits[:, -1].float()
        step = ESampStep.tapped(esamp.decode_layout(esamp.assign_slots(rows), [beta] * n), x, y)
        pred = esamp.distillers.forward(step.shallow, step.layout).rows(step.layout)[torch.argsort(step.layout.sources)]
        cand = filter_candidates(z, temps, torch.full((n,), 1 << 30), torch.full((n,), top_p), torch.full((n,), min_p), cfg.max_candidates)
        fused = esamp.fuse(step, cand, z.gather(1, cand.token_ids), temps)  # also queues the train step
        kept = cand.weights > 0
        zc = z.gather(1, cand.token_ids)
        dc = head[cand.token_ids].matmul(pred.unsqueeze(-1)).squeeze(-1)
        corrs = [torch.corrcoef(torch.stack([zc[i][kept[i]], dc[i][kept[i]]]))[0, 1] for i in range(n) if kept[i].sum() > 2]
        rows["corr"].append(float(torch.stack(corrs).nanmean().detach()) if corrs else float("nan"))
        p = cand.weights / cand.weights.sum(-1, keepdim=True)
        q = fused.weights / fused.weights.sum(-1, keepdim=True)
        rows["kl"].append(float(torch.where(q > 0, q * (q / p.clamp_min(1e-30)).log(), 0.0).sum(-1).mean()))
        rows["flip"].append(float((p.argmax(-1) != q.argmax(-1)).float().mean()))
        rows["rel_mse"].append(float((pred - y).square().mean() / y.square().mean()))
        token = cand.token_ids.gather(1, torch.multinomial(fused.weights, 1, generator=gen))
        out = model(token, past_key_values=past, use_cache=True, output_hidden_states=True)
        past = out.past_key_values
    third = max(1, steps // 3)
    return {key: (statistics.fmean(v[:third]), statistics.fmean(v[-third:])) for key, v in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 8, 15, 22])
    ap.add_argument("--betas", type=float, nargs="+", default=[0.3])
    ap.add_argument("--prompt-train", type=int, nargs="+", default=[0], help="optimizer steps on the prompt")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3])
    ap.add_argument("--inits", nargs="+", default=["zero"], choices=["zero", "svd"])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--min-p", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--prompts", nargs="+", default=list(PROMPTS), choices=list(PROMPTS))
    args = ap.parse_args()
    torch.manual_seed(0)
    path = materialize_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    print("prompt layer beta lr prompt_train | rel_mse first/last third | corr(d,z) | KL(q||p) | top-1 flip")
    for name in args.prompts:
        for layer in args.layers:
            for beta in args.betas:
                for lr in args.lrs:
                    for pt, init in itertools.product(args.prompt_train, args.inits):
                        s = run(model, tok, PROMPTS[name], layer, beta, args.n, args.steps, args.temperature, pt, lr,
                                args.min_p, init, args.top_p)
                        print(f"{name} L{layer} b{beta:g} lr{lr:g} pt{pt} {init} | "
                              + " | ".join(f"{a:.3f}/{b:.3f}" for a, b in s.values()), flush=True)


if __name__ == "__main__":
    main()
