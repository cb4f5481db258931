"""An independent NumPy statement of SLOT (float64), used as a test oracle."""

from __future__ import annotations

import numpy as np


def slot_loss(hidden: np.ndarray, weight: np.ndarray, tokens: list[int], delta: np.ndarray,
              bias: np.ndarray | None = None) -> float:
    """Mean next-token cross-entropy over the prompt with delta added to every hidden state."""
    h = hidden[:-1].astype(np.float64) + delta.astype(np.float64)
    z = h @ weight.astype(np.float64).T
    if bias is not None:
        z = z + bias
    m = z.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))
    y = np.asarray(tokens[1:])
    return float(np.mean(lse - z[np.arange(len(y)), y]))


def slot_loss_and_grad(hidden: np.ndarray, weight: np.ndarray, tokens: list[int],
                       delta: np.ndarray) -> tuple[float, np.ndarray]:
    w = weight.astype(np.float64)
    h = hidden[:-1].astype(np.float64) + delta.astype(np.float64)
    z = h @ w.T
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    y = np.asarray(tokens[1:])
    n = len(y)
    loss = float(np.mean(-np.log(p[np.arange(n), y])))
    g = p.sum(axis=0)
    np.subtract.at(g, y, 1.0)
    g /= n
    return loss, w.T @ g


def slot_adamw(hidden: np.ndarray, weight: np.ndarray, tokens: list[int], *, steps: int, lr: float,
               beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-5,
               weight_decay: float = 1e-8) -> tuple[np.ndarray, list[float]]:
    """The published loop: AdamW (decoupled weight decay) on delta, losses before each step."""
    d = hidden.shape[1]
    delta = np.zeros(d)
    m = np.zeros(d)
    v = np.zeros(d)
    losses = []
    for t in range(1, steps + 1):
        loss, g = slot_loss_and_grad(hidden, weight, tokens, delta)
        losses.append(loss)
        delta = delta * (1.0 - lr * weight_decay)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        denom = np.sqrt(v) / np.sqrt(1 - beta2 ** t) + eps
        delta = delta - (lr / (1 - beta1 ** t)) * m / denom
    return delta, losses
