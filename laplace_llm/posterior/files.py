"""The state of a LoRA Laplace approximation and its posterior file.

:class:`LoRAFiles` holds :meth:`~LoRAFiles.state_dict`, :meth:`~LoRAFiles.load_state_dict`
and :meth:`~LoRAFiles.save` of :class:`~laplace_llm.posterior.base.LoRALaplaceBase`, and
the identity of a fit (``_file_identity``) that the posterior file and the fit checkpoint
both hold; :func:`laplace_llm.posterior.base.load` reads a file back. The format is
:mod:`laplace_llm.serialization`'s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from laplace.baselaplace import ParametricLaplace

from laplace_llm import serialization, sharding
from laplace_llm.options import Evidence

__all__ = ["LoRAFiles"]


class LoRAFiles:
    """State and files of :class:`~laplace_llm.posterior.base.LoRALaplaceBase`.

    A base of that class, never used alone.
    """

    def state_dict(self) -> dict[str, Any]:
        """laplace-torch's state plus the options and the LoRA blocks.

        Holds tensors and plain values only (``torch.load(weights_only=True)`` reads
        it); ``options`` holds the fields of :attr:`_option_names`, ``H`` is the
        structure's curvature (one tensor here).
        """
        self._check_H_init()
        state = ParametricLaplace.state_dict(self)
        state.update(self._file_identity())
        return state

    def _file_identity(self) -> dict[str, Any]:
        """Return what names the fitted posterior in its file and in a fit checkpoint.

        ``options`` (the fields of :attr:`_option_names`), ``dict_key_x``, ``dict_key_y``,
        ``hessian_structure``, ``lora_modules``, ``block_names`` and ``block_shapes``.
        """
        return {
            "options": {k: v for k, v in self.options.to_dict().items()
                        if k in self._option_names},
            "dict_key_x": self.dict_key_x,
            "dict_key_y": self.dict_key_y,
            "hessian_structure": self._key[1],
            "lora_modules": self.lora_modules,
            "block_names": [b.name for b in self.blocks],
            "block_shapes": [list(b.shape) for b in self.blocks],
        }

    def load_state_dict(self, state_dict: dict[str, Any], check_weights: bool = False) -> None:
        """Restore a :meth:`state_dict` fitted on this model's (selected) LoRA blocks.

        Parameters
        ----------
        state_dict : dict
            from :meth:`state_dict` (or read from a posterior file).
        check_weights : bool, default False
            also refuse a state whose mean differs from the model's current LoRA weights.

        Raises
        ------
        ValueError
            the state was fitted on other LoRA blocks (names or shapes; check
            ``lora_modules`` and the adapter), or, with ``check_weights``, on other LoRA
            weights.
        """
        self._check_state(state_dict, check_weights)
        ParametricLaplace.load_state_dict(self, state_dict)
        device = self._device
        self.mean = self.mean.to(device)
        self.prior_mean = self.prior_mean.to(device)
        self.prior_precision = self.prior_precision.to(device)
        self.loss = torch.as_tensor(self.loss, dtype=self._dtype)
        self._load_curvature(state_dict)
        self._posterior_changed()

    def _load_curvature(self, state_dict: dict[str, Any]) -> None:
        """Make the state's ``H`` the curvature, on the model's device in the posterior's dtype."""
        self.H = self.H.to(device=self._device, dtype=self._dtype)

    def _check_state(self, state_dict: dict[str, Any], check_weights: bool) -> None:
        """Refuse a state fitted on other LoRA blocks (or, if asked, other weights)."""
        names = [b.name for b in self.blocks]
        shapes = [list(b.shape) for b in self.blocks]
        theirs = state_dict.get("block_names")
        their_shapes = state_dict.get("block_shapes")
        if (theirs is not None and theirs != names) or (
            their_shapes is not None and [list(s) for s in their_shapes] != shapes
        ):
            theirs = theirs if theirs is not None else names
            their_shapes = their_shapes if their_shapes is not None else shapes
            raise ValueError(
                f"This posterior was fitted on another model: it has {len(theirs)} LoRA "
                f"blocks ({theirs[:2]}…, shapes {[list(s) for s in their_shapes[:2]]}…), the "
                f"model has {len(names)} ({names[:2]}…, shapes {shapes[:2]}…); first "
                f"difference: {_first_diff(theirs, names, their_shapes, shapes)}. Load it "
                "with the model and adapter it was fitted on."
            )
        if check_weights and not self._weights_equal_mean(state_dict["mean"]):
            raise ValueError(
                "This posterior was fitted on other LoRA weights than the model has now "
                "(same blocks, different values): load the adapter it was fitted on, or "
                "pass check_weights=False if you changed the weights on purpose."
            )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted posterior to a safetensors file (no pickle).

        See :mod:`laplace_llm.serialization` for the format.

        Parameters
        ----------
        path : str or PathLike
            a file, or a folder (e.g. the peft adapter folder of the fitted weights),
            which means its :data:`~laplace_llm.serialization.POSTERIOR_FILENAME`.

        Returns
        -------
        Path
            the file written.

        Raises
        ------
        PosteriorFileError
            ``path`` holds a file that is not a posterior of this model's LoRA blocks
            (another model's posterior, an adapter's weights); nothing is written.
        """
        state = self.state_dict()
        path = serialization.posterior_path(path)
        if not sharding.writes_here(self.model):  # a sharded model's file is rank 0's
            return path
        serialization.check_overwrite(path, state["block_names"], state["block_shapes"])
        serialization.write_state(state, path)
        return path

    @classmethod
    def _load_arguments(cls, state: dict[str, Any]) -> dict[str, Any]:
        """Return the constructor arguments of :func:`load` from a state (besides model, likelihood)."""
        kwargs = {
            "temperature": state["temperature"],
            "sigma_noise": state["sigma_noise"],
            "dict_key_x": state["dict_key_x"],
            "dict_key_y": state["dict_key_y"],
            "lora_modules": state["lora_modules"],
            **state["options"],
        }
        # files written before the option existed hold a prior chosen by laplace-torch's
        # evidence (the default again); files that record an evidence keep it
        kwargs.setdefault("evidence", Evidence.MAP)
        return kwargs


def _first_diff(a: list[str], b: list[str], a_shapes: list, b_shapes: list) -> str:
    for i, (x, y, sx, sy) in enumerate(zip(a, b, a_shapes, b_shapes)):
        if x != y or list(sx) != list(sy):
            return f"block {i}: file has '{x}' {list(sx)}, model has '{y}' {list(sy)}"
    return f"file has {len(a)} blocks, model has {len(b)}"
