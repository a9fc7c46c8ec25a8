"""Selected-token logits: an LLM as a C-way classifier (or reward model) for laplace-torch.

A multiple-choice, classification or reward task is one next-token prediction: the logits
of a few token ids (``" A"``, ``" B"``, …) at each sequence's last real token.
:class:`LLMClassifier` returns exactly those, shape ``(batch, C)``, and nothing bigger: it
runs the transformer body, gathers the hidden state at the last real position and applies
the output embedding to that one position, so the ``(batch, length, vocab)`` logits tensor
of a causal LM is never formed.

Input format (what laplace-torch passes through ``model(data)``): a mapping with

* ``input_ids``: LongTensor ``(batch, T)``, or ``(batch, 2, T)`` for reward-model
  preference pairs;
* ``attention_mask`` (optional): same shape, 1 on real tokens, 0 on padding (left or right);
* ``position_ids`` (optional): same shape; when absent they are derived from the mask, so
  the result does not depend on the side or amount of padding;
* ``token_type_ids`` (optional, encoders); every other key (``labels``, …) is ignored.

A bare LongTensor of ``input_ids`` is accepted too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from laplace_llm.data import check_tokenizer
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
from laplace_llm.sharding import as_forward_of

__all__ = ["LLMClassifier"]


_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


class LLMClassifier(nn.Module):
    """An LLM as a classifier over selected next-token logits, or a sequence classifier.

    Parameters
    ----------
    model : nn.Module
        A transformers causal LM (``AutoModelForCausalLM``: Llama, Qwen2, Mistral, GPT-2,
        GPT-NeoX, …) or sequence-classification model (``AutoModelForSequenceClassification``,
        including one-output reward heads and BERT-style encoders), optionally wrapped in a
        peft ``PeftModel``. LoRA layers stay active, also on ``lm_head``.
    target_ids : sequence of int or LongTensor, optional
        ``(C,)`` token ids whose next-token logits are the C class scores. Required for a
        causal LM; ``None`` for a sequence-classification model, whose ``.logits`` are
        returned unchanged.
    center : bool or float, default False
        Remove the common offset of the selected-token logits: ``True`` removes the
        share :attr:`CENTER` (99 %) of their mean, a float in ``[0, 1]`` that share.
        Softmax, the fit and the Monte-Carlo predictive ignore the offset; the probit
        predictive does not (see Notes). Sequence-classification outputs are never
        centred.

    Attributes
    ----------
    target_ids : torch.Tensor or None
        ``(C,)`` long, a non-persistent buffer (it follows ``.to(device)`` and is not saved
        in the ``state_dict``, which holds the model's weights only).
    n_outputs : int
        C, the number of outputs per sequence.

    Notes
    -----
    ``forward`` returns float logits: ``(batch, C)`` for inputs ``(batch, T)``, and
    ``(batch, 2 * C)`` for preference pairs ``(batch, 2, T)`` (for a one-output reward head
    ``(batch, 2)``, the shape laplace-torch's ``likelihood="reward_modeling"`` fits on).
    Half-precision logits are cast to float32 so that losses and curvature are computed in
    float32.

    Post-head logit transforms of transformers' causal LMs that are applied here too: final
    logit soft-capping (Gemma 2/3, ``config.final_logit_softcapping``), Granite's
    ``logits_scaling`` and Cohere's ``logit_scale``. A model family that transforms its
    logits in another way after ``lm_head`` is not covered; compare with
    ``model(**batch).logits`` once when adding a new family.

    Centring: the C selected logits of a causal LM carry an arbitrary common offset (the
    rest of the vocabulary's log-partition is dropped). Softmax ignores it, and so does the
    curvature: every Fisher/GGN probe ``v`` sums to zero over classes, so ``Jᵀv`` is the
    same with centred logits. The GLM predictive does not: its logit covariance has a large
    common-mode part, and the probit approximation, which scales each logit by its own
    ``κ_c = (1 + π/8 σ_c²)^{-1/2}``, then mixes that offset into the prediction and can
    change the argmax. Centring ``f ↦ (I − s 11ᵀ/C) f`` removes the offset and its
    variance. ``s = 1`` is avoided: exact centring makes the logit covariance singular,
    and laplace-torch's Monte-Carlo link draws its samples through a Cholesky factor of
    it. The parameters are the same with or without centring, so a posterior fitted with
    one loads with the other.

    Examples
    --------
    >>> clf = LLMClassifier.from_choices(peft_model, tokenizer, [" A", " B", " C", " D"])
    >>> clf(tokenizer(["Q: ... Answer:"], return_tensors="pt")).shape
    torch.Size([1, 4])
    """

    target_ids: torch.Tensor | None
    #: Share of the common offset that ``center=True`` removes (1 % is kept, so that the
    #: logit covariance stays definite).
    CENTER = 0.99

    #: ``model`` may be sharded with FSDP2 as the root: the forward runs as its forward
    #: (:func:`laplace_llm.sharding.as_forward_of`)
    routes_fsdp_forward = True

    def __init__(
        self,
        model: nn.Module,
        target_ids: Sequence[int] | torch.Tensor | None = None,
        center: bool | float = False,
    ):
        super().__init__()
        self.model = model
        share = self.CENTER if center is True else float(center)
        if not 0.0 <= share <= 1.0:
            raise ValueError(
                f"center must be True, False or a share in [0, 1] of the logits' mean to "
                f"remove; got {center!r}."
            )
        self.center = share
        hf_model = _unwrap_peft(model)
        get_head = getattr(hf_model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None

        if target_ids is None:
            if head is not None:
                raise ValueError(
                    f"{type(hf_model).__name__} is a language model (it has an output "
                    "embedding) but target_ids is None: pass the token ids of the answers, "
                    "e.g. LLMClassifier.from_choices(model, tokenizer, [' A', ' B']), or use "
                    "an AutoModelForSequenceClassification model."
                )
            self.register_buffer("target_ids", None, persistent=False)
            self.n_outputs = int(getattr(_text_config(hf_model.config), "num_labels", 0) or 0)
            return

        if head is None:
            raise ValueError(
                f"target_ids were given but {type(hf_model).__name__} has no output embedding "
                "(get_output_embeddings() is None): pass a causal LM, or target_ids=None for a "
                "sequence-classification model."
            )
        if getattr(hf_model, "base_model", hf_model) is hf_model:
            raise ValueError(
                f"cannot find the transformer body of {type(hf_model).__name__} (its "
                "base_model is the model itself), so the last hidden state cannot be read "
                "without computing every position's vocabulary logits; pass a transformers "
                "causal LM whose base_model_prefix names its body (e.g. 'model')."
            )
        ids = torch.as_tensor(target_ids)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.ndim != 1:
            raise TypeError(
                f"target_ids must be a 1-d sequence of integer token ids, got "
                f"{ids.dtype} of shape {tuple(ids.shape)}."
            )
        if ids.numel() == 0:
            raise ValueError("target_ids is empty: give at least one token id.")
        vocab = _output_vocab_size(hf_model, head)
        bad = [int(i) for i in ids if not 0 <= int(i) < vocab]
        if bad:
            raise ValueError(
                f"target ids {bad} are outside the model's vocabulary [0, {vocab}): check "
                "that the tokenizer belongs to this model."
            )
        self.register_buffer(
            "target_ids", ids.to(torch.long, copy=True), persistent=False
        )
        self.n_outputs = int(ids.numel())

    @classmethod
    def from_choices(
        cls, model: nn.Module, tokenizer: Any, choices: Sequence[str], center: bool | float = False
    ) -> LLMClassifier:
        """Build a classifier over the tokens of answer strings such as ``[" A", " B"]``.

        Parameters
        ----------
        model : nn.Module
            A causal LM, optionally wrapped in peft.
        tokenizer : PreTrainedTokenizerBase
            The model's tokenizer. It must have a pad token and a ``padding_side`` of
            ``"left"`` or ``"right"`` (both work; batches must be padded consistently with it).
        choices : sequence of str
            ``(C,)`` strings, each exactly one token when encoded without special tokens.
            Mind the leading space: ``" A"`` and ``"A"`` are different tokens in most
            BPE vocabularies.
        center : bool or float, default False
            See :class:`LLMClassifier`.

        Returns
        -------
        LLMClassifier
            With ``target_ids[c]`` the token id of ``choices[c]``.

        Raises
        ------
        ValueError
            Fewer than 2 choices; a choice that is not exactly one token; two choices with
            the same token; a token outside the model's vocabulary; a tokenizer without pad
            token or with an unknown padding side.
        TypeError
            ``choices`` is a string or holds non-strings.
        """
        if isinstance(choices, str) or not all(isinstance(c, str) for c in choices):
            raise TypeError(
                f"choices must be a list of strings such as [' A', ' B'], got {choices!r}."
            )
        choices = list(choices)
        if len(choices) < 2:
            raise ValueError(
                f"from_choices needs at least 2 choices, got {len(choices)} ({choices!r}); a "
                "one-output reward model is a sequence-classification model with num_labels=1."
            )
        check_tokenizer(tokenizer)
        ids = []
        for choice in choices:
            encoded = list(tokenizer.encode(choice, add_special_tokens=False))
            if len(encoded) != 1:
                pieces = tokenizer.convert_ids_to_tokens(encoded)
                raise ValueError(
                    f"choice {choice!r} is {len(encoded)} tokens {pieces} (ids {encoded}), not "
                    "exactly one. Answers of several tokens are scored by their likelihood "
                    "with CandidateScorer.from_texts(model, tokenizer, choices); for "
                    "from_choices use single tokens, e.g. letters with a leading space (' A') "
                    "or without it ('A'), depending on the tokenizer."
                )
            ids.append(int(encoded[0]))
        seen: dict[int, str] = {}
        for choice, token in zip(choices, ids):
            if token in seen:
                raise ValueError(
                    f"choices {seen[token]!r} and {choice!r} map to the same token id {token}: "
                    "choose strings that tokenize differently (an unknown word maps to the "
                    "unknown token)."
                )
            seen[token] = choice
        try:
            return cls(model, ids, center=center)
        except ValueError as err:
            raise ValueError(f"choices {choices!r} give token ids {ids}: {err}") from err

    # ------------------------------------------------------------------ inputs
    def _inputs(self, x: Any) -> dict[str, torch.Tensor]:
        if isinstance(x, torch.Tensor):
            x = {"input_ids": x}
        if not isinstance(x, Mapping):
            raise TypeError(
                f"LLMClassifier takes a dict (or BatchEncoding) with 'input_ids', or a LongTensor "
                f"of input ids, got {type(x).__name__}."
            )
        if "input_ids" not in x:
            raise ValueError(
                f"the input has no 'input_ids' (keys: {sorted(x)}): pass the tokenizer's output, "
                "e.g. tokenizer(texts, padding=True, return_tensors='pt')."
            )
        device = _model_device(_unwrap_peft(self.model))
        inputs = {}
        for key in _INPUT_KEYS:
            value = x.get(key)
            if value is None:
                continue
            value = torch.as_tensor(value)
            if value.dtype.is_floating_point:
                raise TypeError(f"{key} must be integer, got {value.dtype}.")
            inputs[key] = value.to(device=device, dtype=torch.long)
        shape = inputs["input_ids"].shape
        for key, value in inputs.items():
            if value.shape != shape:
                raise ValueError(
                    f"{key} has shape {tuple(value.shape)} but input_ids has {tuple(shape)}."
                )
        if len(shape) == 3 and shape[1] != 2:
            raise ValueError(
                f"input_ids of shape {tuple(shape)}: a 3-d input must be preference pairs "
                "(batch, 2, T)."
            )
        if len(shape) not in (2, 3):
            raise ValueError(
                f"input_ids must be (batch, T) or preference pairs (batch, 2, T), got "
                f"{tuple(shape)}."
            )
        if "attention_mask" not in inputs:
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        return inputs

    # ------------------------------------------------------------------ forward
    def forward(self, x: Mapping[str, Any] | torch.Tensor) -> torch.Tensor:
        """Class logits of each sequence (or of both sequences of each pair).

        Parameters
        ----------
        x : Mapping or torch.Tensor
            Batch as described in the module docstring: ``input_ids`` ``(batch, T)`` or
            ``(batch, 2, T)``, optional ``attention_mask``, ``position_ids``,
            ``token_type_ids``; or a LongTensor of input ids.

        Returns
        -------
        torch.Tensor
            ``(batch, C)``, or ``(batch, 2 * C)`` for pairs (first sequence's C logits,
            then the second's); float32 (float64 if the model is float64).
        """
        # a sharded (FSDP2) PeftModel all-gathers around this as around its own forward
        return as_forward_of(self.model, self._logits, x)

    def _logits(self, x: Mapping[str, Any] | torch.Tensor) -> torch.Tensor:
        inputs = self._inputs(x)
        pair = inputs["input_ids"].ndim == 3
        if pair:
            batch = inputs["input_ids"].shape[0]
            inputs = {k: v.reshape(-1, v.shape[-1]) for k, v in inputs.items()}
        if self.target_ids is None:
            logits = self._sequence_classifier_logits(inputs)
        else:
            logits = self._selected_logits(inputs)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        if self.center and self.target_ids is not None:
            logits = logits - self.center * logits.mean(-1, keepdim=True)
        if pair:
            logits = logits.reshape(batch, -1)
        return logits

    def _selected_logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        hf_model = _unwrap_peft(self.model)
        backbone = hf_model.base_model
        mask = inputs["attention_mask"]
        last = last_token_index(mask)
        kwargs = {"input_ids": inputs["input_ids"], "attention_mask": mask}
        if _accepts(backbone, "position_ids"):
            positions = inputs.get("position_ids")
            kwargs["position_ids"] = positions if positions is not None else position_ids_from_mask(mask)
        if "token_type_ids" in inputs and _accepts(backbone, "token_type_ids"):
            kwargs["token_type_ids"] = inputs["token_type_ids"]
        if _accepts(backbone, "use_cache"):
            kwargs["use_cache"] = False  # a KV cache is never reused here
        out = backbone(**kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        h_last = hidden[rows, last.to(hidden.device)].unsqueeze(1)  # (batch, 1, hidden)
        # Calling the head module (not its weight) keeps a LoRA adapter on lm_head active;
        # it sees one position per sequence, so only (batch, 1, vocab) logits exist.
        vocab_logits = hf_model.get_output_embeddings()(h_last)[:, 0]
        vocab_logits = _post_head_transform(hf_model, vocab_logits)
        return vocab_logits[:, self.target_ids.to(vocab_logits.device)]

    def _sequence_classifier_logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        if "token_type_ids" in inputs:
            kwargs["token_type_ids"] = inputs["token_type_ids"]
        positions = inputs.get("position_ids")
        mask = inputs["attention_mask"]
        # Left padding shifts absolute positions; correct them only then, so that unpadded
        # and right-padded inputs reach the model exactly as given.
        if positions is None and bool((mask[:, 0] == 0).any()):
            positions = position_ids_from_mask(mask)
        if positions is not None and _accepts(_unwrap_peft(self.model), "position_ids"):
            kwargs["position_ids"] = positions
        out = self.model(**kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits.reshape(logits.shape[0], -1)

    def extra_repr(self) -> str:
        """Show the target ids, the number of outputs and the centring share."""
        ids = None if self.target_ids is None else self.target_ids.tolist()
        return f"target_ids={ids}, n_outputs={self.n_outputs}, center={self.center}"
