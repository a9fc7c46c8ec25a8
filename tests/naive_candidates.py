"""The naive reference for candidate scoring, and candidate batches for tests.

:class:`NaiveScorer` computes what :class:`laplace_llm.CandidateScorer` must compute,
the slow obvious way: for every example and every candidate, one full forward of the
unpadded ``prompt + candidate`` through the causal LM (``model(input_ids).logits``, all
positions, the full vocabulary), a log-softmax, and the sum (or mean) of the candidate
tokens' log-probabilities. No key/value cache, no padding, no hooks.

:func:`position_jacobians` gives, for one example and one module, the Jacobian of the C
scores with respect to that module's output at each of the example's positions as
defined in :mod:`laplace_llm.models.candidates` (the prompt positions, shared by the C full
forwards, then for each candidate its positions but the last), by adding a perturbation
``ε`` to the module's output in the naive forwards.
"""

from __future__ import annotations

import torch
from torch import nn

from laplace_llm.models.candidates import MISSING_LOGIT
from laplace_llm.models.classifier import _unwrap_peft


def _pieces(x, b):
    prompt = x["input_ids"][b][x["attention_mask"][b].bool()]
    cands = []
    C = x["candidate_ids"].shape[1]
    for c in range(C):
        m = x.get("candidate_attention_mask")
        ids = x["candidate_ids"][b, c]
        cands.append(ids if m is None else ids[m[b, c].bool()])
    return prompt, cands


class NaiveScorer(nn.Module):
    """C full forwards of prompt + candidate per example; same parameters as the model."""

    def __init__(self, model: nn.Module, reduction: str = "sum", hook=None):
        super().__init__()
        self.model = model
        self.reduction = reduction

    def forward(self, x):
        hf = _unwrap_peft(self.model)
        rows = []
        for b in range(x["input_ids"].shape[0]):
            prompt, cands = _pieces(x, b)
            scores = []
            for c, cand in enumerate(cands):
                present = x.get("candidate_mask")
                if present is not None and not bool(present[b, c]):
                    scores.append(torch.tensor(MISSING_LOGIT, dtype=torch.float64))
                    continue
                full = torch.cat([prompt, cand])[None]
                logp = hf(input_ids=full, use_cache=False).logits[0].log_softmax(-1)
                P = prompt.shape[0]
                s = logp[P - 1 : P - 1 + cand.shape[0]].gather(-1, cand[:, None]).sum()
                scores.append(s / cand.shape[0] if self.reduction == "mean" else s)
            rows.append(torch.stack(scores))
        return torch.stack(rows)


def position_jacobians(naive: NaiveScorer, module: nn.Module, x, b: int, head: bool = False):
    """``J (C, T_n, d_out)`` of example ``b``'s scores w.r.t. ``module``'s outputs at its
    positions, the inputs ``a (T_n, d_in)`` there, and the scores ``(C,)``.

    ``head=True`` for a module of the LM head, whose output reaches a score only at the
    positions that predict a candidate token: of the prompt, only its last position.
    """
    prompt, cands = _pieces(x, b)
    P = prompt.shape[0]
    first = P - 1 if head else 0
    hf = _unwrap_peft(naive.model)
    state = {"copy": 0, "eps": None, "a": {}, "d_out": None}
    sizes = [P - first] + [c.shape[0] - 1 for c in cands]
    offsets = torch.tensor([0] + sizes).cumsum(0).tolist()

    def hook(mod, inputs, output):
        c = state["copy"]
        state["a"][c] = inputs[0].detach()[0]
        state["d_out"] = output.shape[-1]
        eps = state["eps"]
        if eps is None:
            return output
        add = torch.zeros_like(output)
        add[0, first:P] = eps[: P - first]
        n = sizes[c + 1]
        add[0, P : P + n] = eps[offsets[c + 1] : offsets[c + 1] + n]
        return output + add

    def scores_of(eps):
        state["eps"] = eps
        out = []
        for c, cand in enumerate(cands):
            state["copy"] = c
            full = torch.cat([prompt, cand])[None]
            logp = hf(input_ids=full, use_cache=False).logits[0].log_softmax(-1)
            s = logp[P - 1 : P - 1 + cand.shape[0]].gather(-1, cand[:, None]).sum()
            out.append(s / cand.shape[0] if naive.reduction == "mean" else s)
        return torch.stack(out)

    handle = module.register_forward_hook(hook)
    try:
        f0 = scores_of(None).detach()
        a = torch.cat(
            [state["a"][0][first:P]]
            + [state["a"][c][P : P + sizes[c + 1]] for c in range(len(cands))]
        )
        dtype = a.dtype
        J = torch.func.jacrev(scores_of)(torch.zeros(offsets[-1], state["d_out"], dtype=dtype))
    finally:
        handle.remove()
    return J, a, f0


def candidate_batch(
    n: int,
    C: int,
    seed: int = 0,
    prompt_len=(2, 6),
    cand_len=(1, 4),
    left: bool = False,
    vocab: int = 100,
    n_classes: int | None = None,
) -> dict[str, torch.Tensor]:
    """Random prompts (lengths in ``prompt_len``, padded left or right) with C random
    candidates each (lengths in ``cand_len``, right-padded) and labels."""
    g = torch.Generator().manual_seed(seed)
    T, L = prompt_len[1], cand_len[1]
    ids = torch.zeros(n, T, dtype=torch.long)
    mask = torch.zeros(n, T, dtype=torch.long)
    cids = torch.zeros(n, C, L, dtype=torch.long)
    cmask = torch.zeros(n, C, L, dtype=torch.long)
    for b in range(n):
        t = int(torch.randint(prompt_len[0], T + 1, (1,), generator=g))
        sl = slice(T - t, T) if left else slice(0, t)
        ids[b, sl] = torch.randint(8, vocab, (t,), generator=g)
        mask[b, sl] = 1
        for c in range(C):
            k = int(torch.randint(cand_len[0], L + 1, (1,), generator=g))
            cids[b, c, :k] = torch.randint(8, vocab, (k,), generator=g)
            cmask[b, c, :k] = 1
    labels = torch.randint(0, n_classes or C, (n,), generator=g)
    return {
        "input_ids": ids, "attention_mask": mask, "candidate_ids": cids,
        "candidate_attention_mask": cmask, "labels": labels,
    }


def split(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """Items of a batch as a list of per-example dicts (for a DictDataset)."""
    n = batch["input_ids"].shape[0]
    return [{k: v[i] for k, v in batch.items()} for i in range(n)][: size or n]
