"""Answers that are text: candidates scored by their log-likelihood after the prompt.

:class:`CandidateScorer` turns a (peft) causal LM into a C-way classifier whose logit for
candidate ``c`` is the log-likelihood of its tokens after the prompt,

    ``s_c = Σ_k log p(t_{c,k} | prompt, t_{c,<k})``   (``reduction="mean"``: divided by
    the candidate's length),

so a candidate may be any number of tokens, and each question may carry its own
candidates. The C scores are the logits of laplace-torch's ``"classification"``
likelihood: softmax over them is the probability that the answer is ``c`` among the C
candidates, and ``fit``, the evidence, the GLM and NN predictives, ``sample`` and
posterior files work as with :class:`~laplace_llm.LLMClassifier`.

Batch format (a dict; every other key, e.g. ``labels``, is ignored):

* ``input_ids``, ``attention_mask``: ``(B, T)`` prompts, padded left or right;
* ``candidate_ids``: ``(B, C, L)`` the candidates' tokens, each candidate's real tokens
  first (right padding); absent when the scorer holds fixed candidates
  (:meth:`CandidateScorer.from_texts`), which every example then shares;
* ``candidate_attention_mask``: ``(B, C, L)``, 1 on real candidate tokens (default: all
  real);
* ``candidate_mask``: ``(B, C)`` optional, 0 for a candidate that is missing (a question
  with fewer than C candidates, padded): its logit is :data:`MISSING_LOGIT`, so its
  probability is exactly 0, its Jacobian is 0, and the Fisher and GLM stay finite.

Cost. The prompt runs once per example (batch ``B``); its key/value cache is repeated C
times and serves one continuation call of batch ``B·C``. The continuation's input is each
candidate without its last token: token ``t_{c,k}`` is read only to predict
``t_{c,k+1}``, and the last token is only predicted. Vocabulary logits exist only where a
candidate token is predicted (the last real prompt position, and each continuation
position followed by a real candidate token), one position's ``V`` logits at a time per
such row; only their gathered log-softmax values are kept, never a ``(B, T, V)`` tensor.
With single-token candidates there is no continuation call and the scores are the
log-softmax of the selected next-token logits, so their softmax is that of
:class:`~laplace_llm.LLMClassifier` over the same token ids.

Curvature (see :mod:`laplace_llm.curvature.kfac`, "call layouts"). The scorer tells the hooks,
for every call of a LoRA module, which positions are real and which example each row
belongs to. An example's positions for a module are those where the module acts on it and
its output reaches a score. For the transformer body these are its real prompt positions
and the real input positions of its C continuations: ``T_n = P_n + Σ_c (L_{n,c} − 1)``
with ``P_n`` the real prompt tokens and ``L_{n,c}`` the real tokens of candidate ``c`` (a
candidate's last token is only predicted and never enters the network). For the LM head
they are the predicting positions, ``T_n = 1 + Σ_c (L_{n,c} − 1)``. K-FAC
``expand`` counts each of those positions once with weight ``1/(N T_n)`` in ``A``;
``reduce`` averages ``a`` over them and sums ``g`` over them (prompt row and C continuation
rows together); the Jacobian-free GLM sums ``Σ_t g aᵀ`` over them, so it stays one forward
and C backward passes. Padding (prompt padding on either side, candidate padding and the
positions of missing candidates) never counts. The LM head, when it carries LoRA, is
called on the predicting positions only: one row per position with ``T = 1``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from laplace_llm.models._hf import (
    _accepts,
    _model_device,
    _output_vocab_size,
    _post_head_transform,
    _text_config,
    _unwrap_peft,
    last_token_index,
    position_ids_from_mask,
)
from laplace_llm.models.call_layout import CallLayout

__all__ = ["CandidateScorer", "MISSING_LOGIT", "encode_candidates"]

#: Logit of a missing candidate: ``exp`` of it underflows to exactly 0 against any real
#: score in float32 and float64, while differences between logits stay finite.
MISSING_LOGIT = -1.0e4


def _context_length(hf_model: nn.Module) -> int | None:
    config = _text_config(hf_model.config)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def encode_candidates(
    tokenizer: Any, texts: Sequence[Sequence[str]] | Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of candidate strings, right-padded, as the batch format wants them.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
        Encodes without special tokens. Mind leading spaces: a candidate that follows
        ``"Answer:"`` is usually written ``" Paris"``.
    texts : sequence of str, or sequence of sequences of str
        ``(C,)`` candidates shared by all examples, or ``(B, C)`` per-example candidates
        (the same C for every example; pad with :func:`laplace_llm.data` helpers
        otherwise).

    Returns
    -------
    ids, mask : torch.Tensor
        ``(C, L)`` or ``(B, C, L)`` long, ``L`` the longest candidate; the mask is 1 on
        real tokens.

    Raises
    ------
    ValueError
        A candidate that encodes to no token (e.g. ``""``), or rows of different C.
    """
    if isinstance(texts, str):
        raise TypeError(f"candidates must be a list of strings, got the string {texts!r}.")
    nested = len(texts) > 0 and all(not isinstance(t, str) for t in texts)
    rows = [list(t) for t in texts] if nested else [list(texts)]
    if any(isinstance(t, str) for t in rows) or not all(
        isinstance(c, str) for row in rows for c in row
    ):
        raise TypeError(f"candidates must be strings (or lists of strings), got {texts!r}.")
    sizes = {len(row) for row in rows}
    if len(sizes) > 1:
        raise ValueError(
            f"examples have different numbers of candidates {sorted(sizes)}; pad them to the "
            "same C with a candidate_mask (laplace_llm.data.collate_candidates does)."
        )
    encoded = []
    for i, row in enumerate(rows):
        out = []
        for c, text in enumerate(row):
            ids = list(tokenizer.encode(text, add_special_tokens=False))
            if not ids:
                where = f"example {i}, candidate {c}" if nested else f"candidate {c}"
                raise ValueError(
                    f"{where} ({text!r}) encodes to no token; every candidate needs at "
                    "least one token (drop empty answers or mark them missing)."
                )
            out.append(ids)
        encoded.append(out)
    L = max(len(ids) for row in encoded for ids in row)
    C = len(rows[0])
    ids = torch.zeros(len(rows), C, L, dtype=torch.long)
    mask = torch.zeros(len(rows), C, L, dtype=torch.long)
    for i, row in enumerate(encoded):
        for c, tokens in enumerate(row):
            ids[i, c, : len(tokens)] = torch.as_tensor(tokens)
            mask[i, c, : len(tokens)] = 1
    return (ids, mask) if nested else (ids[0], mask[0])


class CandidateScorer(nn.Module):
    """A causal LM as a classifier over text candidates scored by their log-likelihood.

    Parameters
    ----------
    model : nn.Module
        A transformers causal LM whose body accepts a key/value cache (Llama, Qwen2,
        Mistral, GPT-2, GPT-NeoX, …), optionally wrapped in peft.
    candidate_ids : LongTensor or nested sequence of int, optional
        ``(C, L)`` fixed candidates shared by every example (right-padded), or ``None``
        when batches carry their own ``candidate_ids``.
    candidate_attention_mask : LongTensor, optional
        ``(C, L)``, 1 on real tokens of ``candidate_ids`` (default: all real).
    n_candidates : int, optional
        C of per-example candidates; every batch must have exactly C (pad with a
        ``candidate_mask``). Required when ``candidate_ids`` is ``None``.
    reduction : {"sum", "mean"}, default "sum"
        Score a candidate by the sum of its tokens' log-probabilities, or their mean.
    center : bool, default False
        Subtract 99 % of the mean score of the present candidates from each score
        (softmax and Fisher unchanged; see
        :class:`laplace_llm.LLMClassifier` (``center=True``) for why the probit
        predictive wants it).

    Attributes
    ----------
    n_outputs : int
        C.
    call_layout : CallLayout or None
        During a forward, the layout of the module calls running (read by
        :class:`~laplace_llm.curvature.kfac.LoRAKFAC`'s hooks); ``None`` otherwise.

    Notes
    -----
    ``forward`` returns ``(B, C)`` float scores (float32 for half-precision models).
    """

    keep_offset = 0.01

    def __init__(
        self,
        model: nn.Module,
        candidate_ids: torch.Tensor | Sequence[Sequence[int]] | None = None,
        candidate_attention_mask: torch.Tensor | None = None,
        *,
        n_candidates: int | None = None,
        reduction: str = "sum",
        center: bool = False,
        _allow_one: bool = False,
    ):
        super().__init__()
        self.model = model
        self.call_layout: CallLayout | None = None
        hf_model = _unwrap_peft(model)
        get_head = getattr(hf_model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if head is None or getattr(hf_model, "base_model", hf_model) is hf_model:
            raise ValueError(
                f"{type(hf_model).__name__} is not a causal LM with an output embedding and "
                "a transformer body (base_model): CandidateScorer scores candidate tokens "
                "with the LM head; pass an AutoModelForCausalLM (optionally with peft)."
            )
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}.")
        self.reduction = reduction
        self.center = bool(center)
        self.vocab_size = _output_vocab_size(hf_model, head)
        self.context_length = _context_length(hf_model)
        minimum = 1 if _allow_one else 2
        if candidate_ids is None:
            self.register_buffer("candidate_ids", None, persistent=False)
            self.register_buffer("candidate_attention_mask", None, persistent=False)
            if n_candidates is None:
                raise ValueError(
                    "give either fixed candidates (candidate_ids, or "
                    "CandidateScorer.from_texts) or n_candidates, the C of the per-example "
                    "candidates that batches carry."
                )
            if isinstance(n_candidates, bool) or not isinstance(n_candidates, int):
                raise TypeError(f"n_candidates must be an integer, got {n_candidates!r}.")
            C = n_candidates
        else:
            ids = torch.as_tensor(candidate_ids)
            if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.ndim != 2:
                raise TypeError(
                    f"candidate_ids must be integer token ids of shape (C, L), got {ids.dtype} "
                    f"of shape {tuple(ids.shape)}."
                )
            mask = (
                torch.ones_like(ids)
                if candidate_attention_mask is None
                else torch.as_tensor(candidate_attention_mask).to(torch.long)
            )
            if mask.shape != ids.shape:
                raise ValueError(
                    f"candidate_attention_mask has shape {tuple(mask.shape)} but candidate_ids "
                    f"has {tuple(ids.shape)}."
                )
            self._check_candidates(ids[None], mask[None], None)
            C = ids.shape[0]
            if n_candidates is not None and n_candidates != C:
                raise ValueError(f"n_candidates={n_candidates} but {C} candidates were given.")
            self.register_buffer("candidate_ids", ids.to(torch.long, copy=True), persistent=False)
            self.register_buffer("candidate_attention_mask", mask.clone(), persistent=False)
        if C < minimum:
            raise ValueError(
                f"a classifier over candidates needs at least 2 of them, got {C}: with one "
                "candidate its probability is always 1. To score one answer's likelihood "
                "use laplace_llm.posterior.generation.answer_log_likelihood."
            )
        self.n_outputs = int(C)

    @classmethod
    def from_texts(
        cls,
        model: nn.Module,
        tokenizer: Any,
        texts: Sequence[str],
        *,
        reduction: str = "sum",
        center: bool = False,
    ) -> CandidateScorer:
        """Build a scorer over fixed answer strings shared by all examples, of any token length.

        Parameters
        ----------
        model : nn.Module
            A causal LM, optionally wrapped in peft.
        tokenizer : PreTrainedTokenizerBase
            Encodes each text without special tokens; needs ``padding_side`` "left" or
            "right" and a pad token (for the prompts' batches).
        texts : sequence of str
            ``(C,)`` labels as the model should continue the prompt, e.g.
            ``[" very negative", " negative", " positive"]``.
        reduction, center
            As :class:`CandidateScorer`.

        Raises
        ------
        ValueError
            Fewer than 2 texts, an empty text, two texts with the same tokens, a tokenizer
            without pad token or padding side.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts must be a list of strings, got {texts!r}.")
        texts = list(texts)
        if len(texts) < 2:
            raise ValueError(
                f"from_texts needs at least 2 candidate texts, got {len(texts)} ({texts!r}): "
                "with one candidate its probability is always 1."
            )
        if getattr(tokenizer, "padding_side", None) not in ("left", "right"):
            raise ValueError(
                f"the tokenizer's padding side is {getattr(tokenizer, 'padding_side', None)!r};"
                " set tokenizer.padding_side = 'left' or 'right'."
            )
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError(
                "the tokenizer has no pad token, so prompts cannot be batched: set "
                "tokenizer.pad_token = tokenizer.eos_token."
            )
        ids, mask = encode_candidates(tokenizer, texts)
        seen: dict[tuple[int, ...], str] = {}
        for text, row, m in zip(texts, ids, mask):
            key = tuple(row[m.bool()].tolist())
            if key in seen:
                raise ValueError(
                    f"candidates {seen[key]!r} and {text!r} encode to the same tokens {list(key)}; "
                    "they could never be told apart."
                )
            seen[key] = text
        return cls(model, ids, mask, reduction=reduction, center=center)

    # ------------------------------------------------------------------ inputs
    def _check_candidates(self, ids, mask, present) -> None:
        """``ids``/``mask`` ``(B, C, L)``; ``present`` ``(B, C)`` bool or None."""
        real = ids[mask.bool()]
        outside = real[(real < 0) | (real >= self.vocab_size)]
        if outside.numel():
            bad = outside.unique()[:5].tolist()
            raise ValueError(
                f"candidate token ids {bad} are outside the model's vocabulary "
                f"[0, {self.vocab_size}): check that the tokenizer belongs to this model."
            )
        m = mask != 0
        if m.shape[-1] > 1 and bool((m[..., 1:] & ~m[..., :-1]).any()):
            raise ValueError(
                "candidate_attention_mask must put each candidate's real tokens first (right "
                "padding): a 0 is followed by a 1."
            )
        length = m.sum(-1)
        empty = (length == 0) if present is None else (length == 0) & present
        if bool(empty.any()):
            b, c = (int(v) for v in empty.nonzero()[0])
            raise ValueError(
                f"candidate {c} of example {b} has no token; every candidate needs at least "
                "one (give it a candidate_mask of 0 if it is a missing candidate)."
            )

    def _inputs(self, x: Any) -> dict[str, torch.Tensor]:
        if not isinstance(x, Mapping) or "input_ids" not in x:
            raise TypeError(
                "CandidateScorer takes a dict batch with 'input_ids' (prompts), optional "
                "'attention_mask', and 'candidate_ids' unless it holds fixed candidates; got "
                f"{type(x).__name__}"
                + (f" with keys {sorted(x)}" if isinstance(x, Mapping) else "")
                + "."
            )
        device = _model_device(_unwrap_peft(self.model))

        def long(key):
            value = x.get(key)
            if value is None:
                return None
            value = torch.as_tensor(value)
            if value.dtype.is_floating_point:
                raise TypeError(f"{key} must be integer, got {value.dtype}.")
            return value.to(device=device, dtype=torch.long)

        ids, mask = long("input_ids"), long("attention_mask")
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, T) prompts, got {tuple(ids.shape)}.")
        mask = torch.ones_like(ids) if mask is None else mask
        if mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}."
            )
        B = ids.shape[0]
        cand = long("candidate_ids")
        if cand is None:
            if self.candidate_ids is None:
                raise ValueError(
                    "the batch has no 'candidate_ids' and this scorer holds no fixed "
                    "candidates: collate per-example candidates with "
                    "laplace_llm.data.collate_candidates, or build the scorer with from_texts."
                )
            cand = self.candidate_ids.to(device).expand(B, -1, -1)
            cmask = self.candidate_attention_mask.to(device).expand(B, -1, -1)
        else:
            if cand.ndim != 3 or cand.shape[0] != B:
                raise ValueError(
                    f"candidate_ids must be (batch, C, L) with the prompts' batch {B}, got "
                    f"{tuple(cand.shape)}."
                )
            cmask = long("candidate_attention_mask")
            cmask = torch.ones_like(cand) if cmask is None else cmask
            if cmask.shape != cand.shape:
                raise ValueError(
                    f"candidate_attention_mask has shape {tuple(cmask.shape)} but "
                    f"candidate_ids has {tuple(cand.shape)}."
                )
        C = cand.shape[1]
        if C != self.n_outputs:
            raise ValueError(
                f"the batch has {C} candidates per example but this scorer has "
                f"n_outputs={self.n_outputs}; pad every batch to the same C with a "
                "candidate_mask (missing candidates get probability 0)."
            )
        present = x.get("candidate_mask")
        if present is not None:
            present = torch.as_tensor(present).to(device) != 0
            if present.shape != (B, C):
                raise ValueError(
                    f"candidate_mask must be (batch, C) = {(B, C)}, got {tuple(present.shape)}."
                )
            few = present.sum(-1) < 2
            if bool(few.any()):
                rows = few.nonzero().flatten().tolist()
                raise ValueError(
                    f"examples {rows} have fewer than 2 present candidates; a question with one "
                    "answer has nothing to classify: drop it."
                )
        self._check_candidates(cand, cmask, present)
        last_token_index(mask)  # refuses empty prompts
        if self.context_length is not None:
            n_prompt = mask.sum(-1)
            longest = n_prompt + cmask.sum(-1).amax(-1)
            over = longest > self.context_length
            if bool(over.any()):
                b = int(over.nonzero()[0])
                raise ValueError(
                    f"example {b}: its prompt of {int(n_prompt[b])} tokens and longest candidate "
                    f"({int(longest[b] - n_prompt[b])} tokens) exceed the model's context of "
                    f"{self.context_length} positions; truncate the prompt (max_length keeps "
                    "its last tokens) or shorten the candidates."
                )
        return {
            "input_ids": ids, "attention_mask": mask, "candidate_ids": cand,
            "candidate_attention_mask": cmask, "candidate_mask": present,
        }

    # ------------------------------------------------------------------ forward
    @contextlib.contextmanager
    def _layout(self, mask: torch.Tensor, example: torch.Tensor):
        self.call_layout = CallLayout(mask, example)
        try:
            yield
        finally:
            self.call_layout = None

    def _token_log_probs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``log p(targets)`` from hidden states ``(n, H)``; only ``(n, V)`` logits exist."""
        hf_model = _unwrap_peft(self.model)
        logits = hf_model.get_output_embeddings()(hidden)
        logits = _post_head_transform(hf_model, logits)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return logits.log_softmax(-1).gather(-1, targets)

    def forward(self, x: Mapping[str, Any]) -> torch.Tensor:
        """Scores of the C candidates of each example.

        Parameters
        ----------
        x : Mapping
            Batch in the module docstring's format.

        Returns
        -------
        torch.Tensor
            ``(B, C)`` log-likelihoods (sum or mean over each candidate's tokens);
            :data:`MISSING_LOGIT` for missing candidates.
        """
        inputs = self._inputs(x)
        hf_model = _unwrap_peft(self.model)
        backbone = hf_model.base_model
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        cand, cmask = inputs["candidate_ids"], inputs["candidate_attention_mask"]
        B, C, L = cand.shape
        device = ids.device
        rows = torch.arange(B, device=device)
        n_prompt = mask.sum(-1)

        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        positions = _accepts(backbone, "position_ids")
        if positions:
            kwargs["position_ids"] = position_ids_from_mask(mask)
        cache_key = "cache" if _accepts(backbone, "cache") else "past_key_values"
        cache = None
        if L > 1:
            from transformers import DynamicCache

            try:
                cache = DynamicCache(config=hf_model.config)
            except TypeError:  # older transformers
                cache = DynamicCache()
            kwargs[cache_key] = cache
            kwargs["use_cache"] = True
        elif _accepts(backbone, "use_cache"):
            kwargs["use_cache"] = False
        with self._layout(mask, rows):
            out = backbone(**kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        h_last = hidden[rows, last_token_index(mask).to(hidden.device)]  # (B, H)
        with self._layout(torch.ones(B, 1, device=device, dtype=torch.long), rows):
            scores = self._token_log_probs(h_last, cand[:, :, 0].to(h_last.device))  # (B, C)

        if L > 1:
            if cache.get_seq_length() != ids.shape[1]:
                raise RuntimeError(
                    f"the model filled its key/value cache with {cache.get_seq_length()} of the "
                    f"prompt's {ids.shape[1]} positions (gradient checkpointing in training "
                    "mode turns the cache off): call model.gradient_checkpointing_disable() or "
                    "model.eval() before scoring multi-token candidates."
                )
            # continuation inputs: candidate tokens 0..L-2, real where a next token follows
            cont_ids = cand[:, :, :-1].reshape(B * C, L - 1)
            cont_mask = cmask[:, :, 1:].reshape(B * C, L - 1)
            example = rows.repeat_interleave(C)
            cache.batch_repeat_interleave(C)
            ckwargs: dict[str, Any] = {
                "input_ids": cont_ids,
                "attention_mask": torch.cat([mask.repeat_interleave(C, 0), cont_mask], 1),
                cache_key: cache,
                "use_cache": True,
            }
            if positions:
                ckwargs["position_ids"] = n_prompt.repeat_interleave(C)[:, None] + torch.arange(
                    L - 1, device=device
                )
            with self._layout(cont_mask, example):
                cont = backbone(**ckwargs)
            h = cont.last_hidden_state if hasattr(cont, "last_hidden_state") else cont[0]
            where = cont_mask.bool()
            targets = cand[:, :, 1:].reshape(B * C, L - 1)[where]
            with self._layout(
                torch.ones(targets.shape[0], 1, device=device, dtype=torch.long),
                example[where.nonzero()[:, 0]],
            ):
                lp = self._token_log_probs(h[where.to(h.device)], targets[:, None].to(h.device))
            token_lp = torch.zeros(B * C, L - 1, device=lp.device, dtype=lp.dtype)
            token_lp = token_lp.masked_scatter(where.to(lp.device), lp[:, 0])
            scores = scores + token_lp.sum(-1).reshape(B, C)
            del cache
        if self.reduction == "mean":
            scores = scores / cmask.sum(-1).clamp(min=1).to(scores)
        present = inputs["candidate_mask"]
        if self.center:
            weight = (
                torch.ones_like(scores) if present is None else present.to(scores)
            )
            mean = (scores * weight).sum(-1, keepdim=True) / weight.sum(-1, keepdim=True)
            scores = scores - (1.0 - self.keep_offset) * mean
        if present is not None:
            scores = torch.where(present, scores, torch.full_like(scores, MISSING_LOGIT))
        return scores

    def extra_repr(self) -> str:
        """Describe the candidates and the reduction in the module's repr."""
        fixed = None if self.candidate_ids is None else tuple(self.candidate_ids.shape)
        return (
            f"n_outputs={self.n_outputs}, fixed_candidates={fixed}, reduction={self.reduction!r}, "
            f"center={self.center}"
        )
