"""Type stubs of the native module (see randattn/__init__.py for the public API)."""

from typing import Any

import numpy as np

__version__: str

class Saved:
    @property
    def spec(self) -> str: ...
    @property
    def seed(self) -> int: ...

def methods() -> list[dict[str, Any]]: ...
def canonical_spec(spec: str, settings: list[tuple[str, str]]) -> str: ...
def forward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    spec: str,
    settings: list[tuple[str, str]],
    key_mask: np.ndarray | None = None,
    query_mask: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, Saved]: ...
def forward_projected(
    q: np.ndarray,
    k: np.ndarray,
    x: np.ndarray,
    wv: np.ndarray,
    bv: np.ndarray | None,
    spec: str,
    settings: list[tuple[str, str]],
    key_mask: np.ndarray | None = None,
    query_mask: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, Saved]: ...
def backward(
    saved: Saved, grad_out: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def keep_freed_memory() -> bool: ...
