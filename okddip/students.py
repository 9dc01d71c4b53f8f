"""Which logits are 'the students' of each method, and the metrics the released scripts derive from them."""
import torch
import torch.nn as nn

from common.fast import at_least_fp32

# the name of each method's individual students in the logs: peer<i>, branch<i>, net<i>
INDIVIDUAL_NAMES = {"okddip": "peer", "one": "branch", "dml": "net"}


def student_logits(method, out):
    """Ordered {name: logits}: individual students first, then the leader (OKDDip), the mean-logit 'ensemble' and,
    for ONE, the 'gated' ensemble. `individuals` lists the students whose mean accuracy the released scripts report
    as mean_*_accTop1.

    'ensemble' is what the released scripts logged as *_accTop1: the mean of every column of `pro` (OKDDip: the
    peers; the released shared-block DenseNet returns all m branches as columns, so its ensemble includes the
    leader's branch). For that DenseNet 'ensemble_peers' adds the mean of the m - 1 peers alone."""
    pro = out["pro"]
    prefix = INDIVIDUAL_NAMES[method]
    n = out.get("num_peers", pro.size(-1))
    logits = {f"{prefix}{i}": pro[:, :, i] for i in range(n)}
    individuals = list(logits)
    if method == "okddip" and "leader" in out:
        logits["leader"] = out["leader"]
    logits["ensemble"] = pro.mean(-1)
    if n != pro.size(-1):
        logits["ensemble_peers"] = pro[:, :, :n].mean(-1)
    if method == "one" and out.get("x_m") is not None and out["x_m"].dim() == 2:
        logits["gated"] = out["x_m"]
    return logits, individuals


def diversity_dist(logits_list):
    """The released `dist`: per image, the summed pairwise L2 distance between the softmax outputs of the first
    three students, divided by 3 (hard-coded), averaged over images. Returns (sum over images, images)."""
    probs = [torch.softmax(at_least_fp32(z), dim=1) for z in logits_list[:3]]
    pd = nn.PairwiseDistance(p=2)
    total = sum(pd(probs[a], probs[b]) for a in range(len(probs)) for b in range(a + 1, len(probs)))
    return (total / 3).sum(), probs[0].size(0)
