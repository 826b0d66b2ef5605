"""How big lambda (--rep_weight) must be for the repulsion term to matter next to SPPO's regression.

At step 0 (pi_theta = pi_t, a = 0) the gradient of the regression term is 2 * eta * (1/2 - P_hat) times
the gradient of the summed log-probs: it grows with eta. The repulsion term's gradient does not
depend on eta. This prints both gradient norms on real pairs for several eta, and the lambda at
which repulsion's gradient is 10% of the regression's.

    python bench/rep_scale.py                 # packaged SmolLM2, data/demo_pairs.jsonl, ~1 min on CPU
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import sspo  # noqa: E402


def grad_norm(model, loss):
    model.zero_grad()
    loss.backward(retain_graph=True)
    return float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None)))


def main(data="data/demo_pairs.jsonl", model=common.PACKAGED_MODEL, margin=2.0, out="bench/results/rep_scale.json"):
    lm, tokenizer = common.load_causal_lm(model)
    sspo.disable_dropout(lm)
    pairs, _ = sspo.load_pairs(data, "sppo", 0.0, 1.0)
    examples, _ = sspo.tokenize_pairs(pairs, tokenizer, 1024)
    logps, pooled = sspo.SequenceScorer(lm)(**sspo.collate(examples, tokenizer.pad_token_id))
    b = len(pairs)
    ref = logps.detach()
    w = torch.tensor([p["chosen_winrate"] for p in pairs])
    l = torch.tensor([p["rejected_winrate"] for p in pairs])
    rep = grad_norm(lm, sspo.repulsion_loss(pooled[:b], pooled[b:], margin).mean())
    report = {"pairs": b, "rep_margin": margin, "grad_norm_rep": rep, "by_beta": {}}
    for beta in (1e-3, 1e-2, 1e-1):
        pref = grad_norm(lm, sspo.preference_loss(logps[:b], logps[b:], ref[:b], ref[b:], loss_type="sppo", beta=beta,
                                                  chosen_winrate=w, rejected_winrate=l).mean())
        report["by_beta"][str(beta)] = {"grad_norm_pref": pref, "lambda_for_10pct": 0.1 * pref / rep}
    common.atomic_write_json(out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    common.cli(main)
