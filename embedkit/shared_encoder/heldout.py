"""The held-out split of pretrain and project: rows linked by an image or a group never straddle it.

Both fit on the training side only and report retrieval on the held-out side, so one definition of
"linked" and one seeded splitter serve both.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import GroupShuffleSplit


def linked_rows(image_index: torch.Tensor, groups: list[str | None] | None) -> np.ndarray:
    """A component id per row: rows sharing an image, or a group, or linked through a chain of
    both (row A shares an image with B, B a patient with C) get the same id."""
    image_index = image_index.numpy()
    n_images = int(image_index.max()) + 1
    groups = groups if groups is not None else [None] * len(image_index)
    has_group = np.array([g is not None for g in groups], dtype=bool)
    names, group_code = np.unique([groups[i] for i in np.nonzero(has_group)[0]], return_inverse=True)
    # A graph whose nodes are images then groups; each grouped row is an edge from its image to its group.
    n_nodes = n_images + len(names)
    edges = coo_matrix((np.ones(len(group_code)), (image_index[has_group], n_images + group_code)),
                       shape=(n_nodes, n_nodes))
    _, component = connected_components(edges, directed=False)
    return component[image_index]


def split_held_out(component: np.ndarray, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out val_fraction of the components (seeded): no image or group is on both sides."""
    n_groups = len(np.unique(component))
    n_val = min(round(val_fraction * n_groups), n_groups - 1) if val_fraction > 0 else 0
    if n_val == 0:
        return torch.arange(len(component)), torch.empty(0, dtype=torch.long)
    splitter = GroupShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
    train, val = next(splitter.split(np.zeros(len(component)), groups=component))
    return torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(val))
