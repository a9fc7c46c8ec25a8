"""The label-free prior candidates that the prior study compares, shared by the scripts
that run it (``paper_table.py`` on SmolLM2, ``prior_study.py`` on the demo's task).

A candidate is ``(evidence, structure, centre)``: which evidence marglik maximises
(laplace-torch's ``"map"`` or the ``"linearised"`` one), the prior's structure (one
``"scalar"`` or one precision per Kronecker block, ``"layerwise"``), and where the prior is
centred (``"zero"``, laplace-torch's prior mean, or ``"init"``, the LoRA weights before
fine-tuning: the point the fine-tune started from, whose random ``A`` carries most of
``‖θ*‖²`` without coming from the data).
"""

from __future__ import annotations

import time
import warnings

import torch
from laplace import Laplace

PRIOR_CANDIDATES = {
    "lt": ("map", "scalar", "zero"),
    "lin": ("linearised", "scalar", "zero"),
    "lt_init": ("map", "scalar", "init"),
    "lt_block": ("map", "layerwise", "zero"),
    "lt_block_init": ("map", "layerwise", "init"),
    "lin_block": ("linearised", "layerwise", "zero"),
    "lin_block_init": ("linearised", "layerwise", "init"),
}


def candidate_prior(la, model, name: str, init: torch.Tensor) -> dict:
    """Tune candidate ``name``'s prior on a copy of the fitted ``la``; return its prior
    precision (a list), evidence, seconds and the warnings marglik raised."""
    evidence, structure, centre = PRIOR_CANDIDATES[name]
    t0 = time.time()
    cand = Laplace(model, "classification", subset_of_weights="lora",
                   hessian_structure="kron", options=la.options.replace(evidence=evidence),
                   lora_modules=la.lora_modules)
    cand.load_state_dict(la.state_dict())
    cand.prior_mean = init.clone() if centre == "init" else torch.zeros_like(init)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cand.optimize_prior_precision(method="marglik", prior_structure=structure)
    return {"prior": cand.prior_precision.detach().reshape(-1).tolist(),
            "evidence": float(cand.log_marginal_likelihood()),
            "seconds": time.time() - t0,
            "warnings": sorted({str(w.message)[:200] for w in caught})}
