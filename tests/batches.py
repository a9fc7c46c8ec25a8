"""Random token data sets as dict batches for the core tests."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

#: Token ids used as the C answer choices by the core tests.
TARGET_IDS = [4, 5, 6, 7]


class DictDataset(torch.utils.data.Dataset):
    """A list of per-example dicts of tensors; the default collate stacks them."""

    def __init__(self, items: list[dict[str, torch.Tensor]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def token_items(
    n: int, length: int, seed: int = 0, vocab: int = 100, n_classes: int = 4, min_length=None
) -> list[dict[str, torch.Tensor]]:
    """``n`` random sequences with labels; lengths in ``[min_length, length]``, right-padded."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        T = length if min_length is None else int(torch.randint(min_length, length + 1, (1,), generator=gen))
        ids = torch.zeros(length, dtype=torch.long)
        mask = torch.zeros(length, dtype=torch.long)
        ids[:T] = torch.randint(8, vocab, (T,), generator=gen)
        mask[:T] = 1
        label = torch.randint(0, n_classes, (), generator=gen)
        items.append({"input_ids": ids, "attention_mask": mask, "labels": label})
    return items


def token_loader(n=12, length=6, seed=0, batch_size=5, **kwargs) -> DataLoader:
    return DataLoader(DictDataset(token_items(n, length, seed, **kwargs)), batch_size=batch_size)


def left_pad(item: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same example with its padding moved to the left."""
    T = int(item["attention_mask"].sum())
    L = item["input_ids"].shape[0]
    ids = torch.zeros_like(item["input_ids"])
    mask = torch.zeros_like(item["attention_mask"])
    ids[L - T :] = item["input_ids"][:T]
    mask[L - T :] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": item["labels"]}
